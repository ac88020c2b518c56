"""Loading a causal LM from disk for QLoRA: safetensors shards, a GGUF file (converted once, cached), or a
bitsandbytes 4-bit checkpoint (its stored state read as it is, never re-quantized).

    model = load_model(smollm2_gguf_path(), backend="numpy")           # CPU, float32 compute
    model = load_model("path/to/llama-dir", backend="cupy", r=64)       # quantized layer by layer onto the GPU
    model = load_model("path/to/bnb-4bit-checkpoint", backend="cupy")   # the saved NF4 state, byte for byte
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from backends import get_backend, placement

from .dtypes import as_torch_dtype
from .files import default_file_mode
from .prepare import prepare_model

# --- the model cache (converted GGUFs; app.hub keeps downloads there) ---

_REPO_ROOT = Path(__file__).resolve().parents[2]


def model_cache_dir() -> Path:
    """$QLORA_MODEL_CACHE or ~/.cache/qlora-ref; never inside the repository (ValueError if it is)."""
    d = Path(os.environ.get("QLORA_MODEL_CACHE") or Path.home() / ".cache" / "qlora-ref").expanduser().resolve()
    if d == _REPO_ROOT or _REPO_ROOT in d.parents:
        raise ValueError(f"model cache {d} is inside the repository {_REPO_ROOT}; point QLORA_MODEL_CACHE elsewhere")
    return d


# --- loading -------------------------------------------------------------------------------------------------------


def _resolve(path_or_gguf) -> tuple[str, str | None]:
    """(directory, gguf file name or None) for a model directory or a .gguf file; ValueError if neither."""
    p = Path(path_or_gguf).expanduser()
    if not p.exists():
        raise ValueError(f"model path {str(p)!r} does not exist; pass a model directory or a .gguf file")
    if p.is_file():
        if p.suffix != ".gguf":
            raise ValueError(f"{str(p)!r} is a file but not a .gguf; pass a .gguf file or a model directory")
        return str(p.parent), p.name
    if not (p / "config.json").is_file():
        raise ValueError(
            f"{str(p)!r} has no config.json; a Hugging Face model directory (safetensors shards) is needed"
        )
    if not any(p.glob("*.safetensors")):
        raise ValueError(f"{str(p)!r} has no *.safetensors weights; convert the checkpoint to safetensors first")
    return str(p), None


def gguf_as_hf_dir(gguf) -> Path:
    """A Hugging Face model directory converted once from a .gguf file and cached (``model_cache_dir()/gguf-hf/``).

    transformers re-parses a GGUF's metadata in pure Python on every ``from_pretrained`` (config, tokenizer and
    weights each: 6-7 s apiece for SmolLM2's 98 MB on an H100 host, measured).  The directory holds what loading the
    GGUF gives — the blocks dequantized to float32 by transformers, saved as safetensors (exact), and the tokenizer
    files — and loads in about a second.  Keyed by the file's resolved path, size and mtime; written atomically.
    """
    import transformers

    gguf = Path(gguf).expanduser().resolve()
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = model_cache_dir() / "gguf-hf" / f"{gguf.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".", suffix=".part"))
    try:
        kw = dict(gguf_file=gguf.name, local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            gguf.parent, dtype=torch.float32, low_cpu_mem_usage=True, **kw
        )
        # transformers marks a GGUF-loaded model as quantized and refuses to save it; its weights are plain float32
        # tensors by now, so drop the marks and save it as the ordinary model it is
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(tmp, safe_serialization=True)
        transformers.AutoTokenizer.from_pretrained(gguf.parent, **kw).save_pretrained(tmp)
        os.chmod(tmp, default_file_mode(directory=True))  # mkdtemp makes 0700
        try:
            os.replace(tmp, out)
        except OSError:  # another process converted it first
            if not (out / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _from_pretrained(cls_name: str, path_or_gguf, **kw):
    os.environ["HF_HUB_OFFLINE"] = "1"  # local files only, never the hub
    import transformers

    directory, gguf_file = _resolve(path_or_gguf)
    cls = getattr(transformers, cls_name)
    if gguf_file is not None:  # parse the GGUF once, then load its converted directory
        directory = str(gguf_as_hf_dir(Path(directory) / gguf_file))
    if "dtype" in kw and int(transformers.__version__.split(".")[0]) < 5:  # transformers 4.x names it torch_dtype
        kw["torch_dtype"] = kw.pop("dtype")
    return cls.from_pretrained(directory, local_files_only=True, **kw)


# --- bitsandbytes 4-bit checkpoints: the stored state read as it is (FMT-5) ---

BNB_BLOB = ".weight.quant_state.bitsandbytes__"  # <module>.weight.quant_state.bitsandbytes__{nf4,fp4} marks a layer


def bnb_4bit_quantization_config(directory) -> dict | None:
    """config.json's quantization_config when the directory is a bitsandbytes 4-bit checkpoint, else None."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return None
    qc = json.loads(path.read_text(encoding="utf-8")).get("quantization_config") or {}
    if qc.get("quant_method") == "bitsandbytes" and (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
        return qc
    return None


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [directory / f for f in shards]
    return sorted(directory.glob("*.safetensors"))


def read_bnb_checkpoint(directory) -> tuple[dict, dict[str, torch.Tensor]]:
    """({module path: Quantized4bit}, {key: tensor} for everything else) of a bitsandbytes 4-bit checkpoint
    (ours from ``save_bnb_checkpoint`` or one written by transformers + bitsandbytes), the 4-bit entries read by
    ``Quantized4bit.from_bnb_state_dict`` as they are: never dequantized or re-quantized."""
    from safetensors.torch import load_file

    import qlora_ref

    sd = {}
    for f in _safetensors_files(Path(directory)):
        sd.update(load_file(str(f)))
    names = sorted({k[: k.index(BNB_BLOB)] for k in sd if BNB_BLOB in k})
    states = {n: qlora_ref.Quantized4bit.from_bnb_state_dict(sd, prefix=f"{n}.weight") for n in names}
    quantized_keys = {f"{n}.weight" for n in names}
    rest = {k: v for k, v in sd.items() if k not in quantized_keys and k.rpartition(".weight.")[0] not in states}
    return states, rest


def _load_bnb_4bit(directory: str, dt: torch.dtype):
    """(model, states): the architecture built on the meta device, its unquantized tensors loaded from the checkpoint
    in ``dt``, and the 4-bit states for ``prepare_model(prequantized=states)`` (which fills the linears)."""
    import transformers
    from accelerate import init_empty_weights

    states, rest = read_bnb_checkpoint(directory)
    if not states:
        raise ValueError(f"{directory}: config.json says bitsandbytes 4-bit, but no tensor carries a 4-bit state")
    config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    config.__dict__.pop("quantization_config", None)
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary inv_freq) real
        model = transformers.AutoModelForCausalLM.from_config(config, **{dtype_kw: dt})
    stored = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    if "_name_or_path" in stored:  # the name it was saved with, not this directory: saving it again is the same file
        model.config._name_or_path = stored["_name_or_path"]
    tensors = {k: v.to(dt) if v.is_floating_point() else v for k, v in rest.items()}
    _, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    if unexpected:
        raise ValueError(f"{directory}: tensors this {type(model).__name__} does not have: {sorted(unexpected)[:3]}")
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    absent = [n for n, p in model.named_parameters() if p.is_meta and n.removesuffix(".weight") not in states]
    if absent:
        raise ValueError(f"{directory}: the checkpoint lacks {len(absent)} tensor(s), e.g. {absent[:3]}")
    return model, states


def load_model(path_or_gguf, *, backend="numpy", dtype=None, prepare: bool = True, **prepare_kwargs):
    """Load a LLaMA-family causal LM (model dir with safetensors shards, or a .gguf file) and prepare it for QLoRA.

    The 16/32-bit weights are loaded on the CPU (in ``dtype``: float32 when the backend is the CPU one, bfloat16 for
    CUDA) and quantized layer by layer onto the backend's device.  A GGUF file is read once by transformers (needs the
    ``gguf`` package), which dequantizes its blocks (SmolLM2's file is Q4_1) to float32, and cached as a Hugging Face
    directory (``gguf_as_hf_dir``); loads after that read the directory and cast to ``dtype``.
    A bitsandbytes 4-bit checkpoint directory (``quantization_config`` in its config.json: ours from
    ``save_bnb_checkpoint`` or one transformers + bitsandbytes wrote) keeps its 4-bit states as they are (no
    re-quantization: saving it again gives the same bytes); its quantized linears are the targets, and quant_type /
    double_quant / blocksize, if given, must be the stored ones.
    ``prepare=False`` returns the unquantized model (a baseline).  Keyword arguments go to ``prepare_model``.
    """

    be = get_backend(backend) if isinstance(backend, str) else backend
    dt = as_torch_dtype(dtype if dtype is not None else placement(be)[1])
    directory, gguf_file = _resolve(path_or_gguf)
    if prepare and gguf_file is None and bnb_4bit_quantization_config(directory) is not None:
        os.environ["HF_HUB_OFFLINE"] = "1"  # local files only, never the hub
        model, states = _load_bnb_4bit(directory, dt)
        model.eval()
        q = next(iter(states.values()))
        stored = dict(quant_type=q.quant_type, double_quant=q.double_quant, blocksize=q.blocksize)
        for key, value in stored.items():
            if prepare_kwargs.get(key, value) != value:
                raise ValueError(
                    f"{directory} is stored with {key}={value!r} but {key}={prepare_kwargs[key]!r} was asked for; "
                    "a 4-bit checkpoint is loaded as it is (leave it out, or load the 16-bit model to re-quantize)"
                )
        return prepare_model(model, backend=be, prequantized=states, **{**prepare_kwargs, **stored})
    model = _from_pretrained("AutoModelForCausalLM", path_or_gguf, dtype=dt, low_cpu_mem_usage=True)
    model.eval()
    if not prepare:
        return model
    return prepare_model(model, backend=be, **prepare_kwargs)


def load_tokenizer(path_or_gguf):
    """The model's own tokenizer (from the model directory, or embedded in the .gguf file)."""
    return _from_pretrained("AutoTokenizer", path_or_gguf)
