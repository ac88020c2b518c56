"""Files written whole or not at all, with the user's normal permissions: what every writer of this library uses.

write_atomically(path, write)   write(tmp) into a temporary file beside ``path``, fsync, chmod, os.replace
write_json / write_jsonl / write_safetensors   the formats on top of it
default_file_mode()             the mode open() / mkdir() would give under the process umask (mkstemp gives 0600)
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch


def default_file_mode(directory: bool = False) -> int:
    """The mode open() / mkdir() would give a new file (0o666) or directory (0o777) under the process umask."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def write_atomically(path: Path, write) -> None:
    """write(tmp_path) into a temporary file next to `path`, then os.replace it onto `path` with the user's normal
    file mode (mkstemp creates 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path, obj, *, sort_keys: bool = True) -> None:
    """json.dumps(obj, indent=2, sort_keys=sort_keys) to `path`, atomically (sort_keys=False: the dict's order, as a
    run's config.json and summary.json keep it)."""
    text = json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n"
    write_atomically(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_jsonl(path, rows) -> None:
    """One JSON object per line (UTF-8, non-ASCII kept) to `path`, atomically: the file is whole or not there."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    write_atomically(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_safetensors(path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """safetensors.torch.save_file to `path`, atomically (CPU, contiguous tensors)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    write_atomically(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata or {"format": "pt"}))
