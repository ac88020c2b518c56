"""A run's resumable checkpoint: run_dir/checkpoint/ = adapter.safetensors (the LoRA tensors by name),
optimizer.pt, rng.pt (every RNG state) and trainer_state.json (step, data position, history, config, tensor names).

Written atomically: built in .checkpoint-tmp, every file fsynced, then swapped in with two renames (the live one
moved to .checkpoint-old first), so a crash at any point leaves a whole checkpoint that ``find_checkpoint`` finds.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

CHECKPOINT = "checkpoint"
_CKPT_TMP = ".checkpoint-tmp"
_CKPT_OLD = ".checkpoint-old"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(run_dir: str, params: dict, optimizer, rng: dict, state: dict) -> str:
    """Write run_dir/checkpoint from the named LoRA parameters, the optimizer, the RNG states and the JSON ``state``;
    returns its path."""
    from safetensors.torch import save_file

    final = os.path.join(run_dir, CHECKPOINT)
    tmp = os.path.join(run_dir, _CKPT_TMP)
    old = os.path.join(run_dir, _CKPT_OLD)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({n: p.detach().cpu().contiguous() for n, p in params.items()}, os.path.join(tmp, "adapter.safetensors"))
    torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
    torch.save(rng, os.path.join(tmp, "rng.pt"))
    with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
        json.dump(state, f, indent=1)
    for name in os.listdir(tmp):
        with open(os.path.join(tmp, name), "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(run_dir)
    shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(path: str, params: dict, optimizer) -> tuple[dict, dict]:
    """Copy a checkpoint's LoRA tensors into ``params`` and its state into ``optimizer``; returns (trainer state,
    RNG states).  A checkpoint of another model is refused: other tensor names before anything is copied, another
    shape naming the tensor."""
    from safetensors.torch import load_file

    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    if state["param_names"] != list(params):
        raise ValueError(
            f"checkpoint {path!r} holds {len(state['param_names'])} LoRA tensors that do not match this model's "
            f"{len(params)}; resume with the same model, --r and --target"
        )
    weights = load_file(os.path.join(path, "adapter.safetensors"))
    with torch.no_grad():
        for n, p in params.items():
            if tuple(weights[n].shape) != tuple(p.shape):
                raise ValueError(f"checkpoint tensor {n} has shape {tuple(weights[n].shape)}, model {tuple(p.shape)}")
            p.copy_(weights[n])
    optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), weights_only=True))
    return state, torch.load(os.path.join(path, "rng.pt"), weights_only=False)


def find_checkpoint(run_dir: str) -> str | None:
    """run_dir/checkpoint, or the previous one if a crash happened between the two renames of a save."""
    for name in (CHECKPOINT, _CKPT_OLD):
        p = os.path.join(run_dir, name)
        if os.path.isfile(os.path.join(p, "trainer_state.json")):
            return p
    return None
