"""The application: the `qlora` command (cli.py), its run configuration (config.py), the training loop and its
evaluations (trainer.py), data files (data.py), the generated default task (task.py) and model downloads (hub.py).
It sits on the torch library (backends.torchlib), which sits on the ops (backends)."""
