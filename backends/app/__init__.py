"""The application: the `qlora` command (cli.py) and its configuration and validators (config.py); one finetune top
to bottom (finetune.py); the training loop, its datasets and held-out scores (trainer.py) and the evaluations
themselves (evaluate.py); data files (data.py); the generated default task (task.py); the model a command loads
(model.py), output directories written whole (rundir.py) and model downloads (hub.py).
It sits on the torch library (backends.torchlib), which sits on the ops (backends)."""
