"""The QLoRA linear layer: a frozen 4-bit base weight plus a trainable low-rank update (specs/lora.md).

    y = x W_hat^T + b + s * (drop(x) A^T) B^T          W_hat = dequantize_4bit(q)   (BW-7)
      s = alpha / r   (LoRA)   or   alpha / sqrt(r)    (rsLoRA)

    x       (..., in)      activations, compute dtype
    q       Quantized4bit  frozen base of shape (out, in): packed codes + (double-quantized) absmax, never a Parameter
    A       (r, in)        trainable, lora_dtype (PEFT's ``lora_A.weight``), PEFT init: kaiming_uniform(a=sqrt(5))
    B       (out, r)       trainable, lora_dtype (PEFT's ``lora_B.weight``), zero init so training starts at W_hat
    b       (out,)         frozen bias (a buffer), if the original layer had one

Forward: dequantize q into one scratch buffer shared by every layer of the same device and dtype, y = x W_hat^T
(GEMM), then the LoRA term is added to y in place.  Backward, with dY (..., out):

    dX = dY W_hat + drop'(s dY B A)     W_hat dequantized again into the scratch buffer (never stored)
    dB = s dY^T u                        u = drop(x) A^T, (..., r), saved by the forward
    dA = (s dY B)^T drop(x)              drop(x) recomputed from the saved x and the dropout seed

Saved per layer for backward (qlora_ref.memory, MEM-7's LoRA term): u = drop(x) A^T, r values per token in the LoRA
dtype (the ledger's 7 l T r per decoder block), plus x itself, which is the same tensor the block already saves (the
normed input of q/k/v and gate/up, the attention output for o_proj, silu(gate)*up for down_proj: no copy), one integer
seed and references to the parameters A and B.  The dropout mask is redrawn from the seed in backward and x is cast
to the LoRA dtype only transiently, so the ledger's "(1 + l) T n with dropout" / "l T n cast copy" terms (PEFT's
costs) are not incurred here.  Nothing proportional to the weight is kept: the dequantization scratch is one buffer
per device and dtype (MEM-10), sized for the largest layer.

Compute dtype: the backend's (``backends.placement``: float32 for numpy, bfloat16 for cupy) unless asked otherwise.
The dequantization is always the backend's, bound once per layer (``bind_dequantize_4bit``: kernel, launch
configuration and arguments resolved, the shared scratch as its output), so a call is the launch alone: the numpy
backend's pair-LUT (bit-identical to ``qlora_ref.dequantize_4bit``), or the CuPy kernel on torch's current stream
(no host synchronisation, no allocation: the forward and backward can be captured in a CUDA graph).

Two paths run the same math (functional.py): eager code calls ``QLoRAFunction`` (a torch.autograd.Function, the least
host work per call); under ``torch.compile`` the layer calls the ``qlora::linear`` custom operator (ops.py), so the
compiler traces through it without a graph break and fuses the work around it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from backends import get_backend, placement
from backends.numpy_lut import dequantize_4bit_cpu  # noqa: F401  (re-exported: the numpy backend owns it)
from qlora_ref.lora import keep_scale

from . import ops
from .dtypes import DEQUANT_DTYPES, DTYPE_NAMES, as_torch_dtype, round_f64
from .functional import add_lora, lora_backward, lora_forward
from .scratch import current, scratch_buffer, scratch_key

# --- the autograd function -----------------------------------------------------------------------------------------


def dropout_noise(shape, p: float, seed: int, backend, dtype) -> torch.Tensor:
    """keep / (1 - p), keep ~ Bernoulli(1 - p) from a generator seeded with `seed` (LORA-3): entries 0 or 1/(1-p).

    The keep mask is the backend's (``dropout_keep``: numpy's PCG64 for numpy, torch's Philox for cupy).  Seeded per
    call, so backward redraws the forward's mask instead of storing it.  The value 1/(1-p) is the float32 quotient
    f32(1) / f32(1 - p), as in the spec.
    """
    be = get_backend(backend) if isinstance(backend, str) else backend
    scale = keep_scale(p)
    return be.dropout_keep(shape, p, seed).to(dtype).mul_(scale)


def draw_dropout_seed() -> int:
    """The seed of one dropout mask, from torch's global CPU generator (so checkpoint recompute draws it again)."""
    return int(torch.randint(0, 2**62, (1,)).item())


# Decoding up to this many rows goes through the 4-bit matvec (any order, MV-8: matvec_4bit_v3 on cupy), more
# through dequantize + GEMM: the matvec reads the 4-bit bytes once, but its FMAs grow with the rows while a GEMM's
# tensor cores do not (benchmarks/decode_kernels.py, H200: the spec-order kernel at 16 rows ran 10x cuBLAS).
MATVEC_TOKENS = 4
STEP_SEED = -2  # a call's seed meaning "LORA-8's mask from the layer's StepSeed" (dropout.py); -1: no dropout


class QLoRAFunction(torch.autograd.Function):
    """y = x W_hat^T + b + s * (drop(x) A^T) B^T; saves x and u = drop(x) A^T only (see the module docstring).

    ``layer`` provides ``dequantized()`` (W_hat in the compute dtype, in scratch), ``dropout_factor(shape, seed,
    dtype)``, ``bias``, ``scaling``, ``in_features`` and ``out_features``; the math is functional.py's."""

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, layer, seed):
        x2 = x.reshape(-1, layer.in_features)  # (M, in)
        noise = layer.dropout_factor(x2.shape, seed, lora_A.dtype) if seed is not None else None
        y, u = lora_forward(x2, layer.dequantized(), lora_A, lora_B, layer.bias, layer.scaling, noise)
        ctx.save_for_backward(x, u, lora_A, lora_B)  # activations: x and u only; A, B are the parameters themselves
        ctx.layer, ctx.seed = layer, seed
        return y.view(*x.shape[:-1], layer.out_features)

    @staticmethod
    def backward(ctx, dY):
        x, u, lora_A, lora_B = ctx.saved_tensors
        layer, seed = ctx.layer, ctx.seed
        x2 = x.reshape(-1, layer.in_features)
        noise = layer.dropout_factor(x2.shape, seed, lora_A.dtype) if seed is not None else None
        dY2 = dY.reshape(-1, layer.out_features)  # (M, out)
        need_dx = ctx.needs_input_grad[0]
        dX, dA, dB = lora_backward(dY2, x2, u, layer.dequantized, lora_A, lora_B, layer.scaling, noise, need_dx)
        if dX is not None:
            dX = dX.view(x.shape).to(x.dtype)
        return dX, dA, dB, None, None


class CounterNoise:
    """LORA-8's dropout of one layer call (the layer's StepSeed and salt), applied by the backend where functional.py
    uses it instead of being materialised as a noise tensor: ``drop(x2, dtype)`` = x2.to(dtype) * noise and
    ``add_dropped_(acc, d)``: acc += d * noise, each one launch on cupy, the bits of the unfused ops."""

    __slots__ = ("layer",)

    def __init__(self, layer):
        self.layer = layer

    def drop(self, x2, dtype):
        m = self.layer
        return m.backend.dropout_apply_counter(x2, m.dropout, m.step_seed.tensor, m.seed_salt, dtype)

    def add_dropped_(self, acc, d):
        m = self.layer
        return m.backend.dropout_add_counter_(acc, d, m.dropout, m.step_seed.tensor, m.seed_salt)


# --- the module ----------------------------------------------------------------------------------------------------


class QLoRALinear(nn.Module):
    """A frozen 4-bit linear layer with a trainable LoRA update (module docstring has the math).

    q: the base weight of shape (out, in) as a ``Quantized4bit`` whose arrays live on the backend's device (numpy for
    the "numpy" backend, CuPy for "cupy").  It is a plain attribute, not a Parameter or buffer: no gradient, no
    optimizer state, not moved by ``.to()`` (the backend fixes the device).  ``state_dict()`` holds only lora_A,
    lora_B and bias; the 4-bit weight is written by ``backends.torchlib.export``.
    """

    def __init__(
        self,
        q,
        *,
        bias: torch.Tensor | None = None,
        backend="numpy",
        r: int = 64,
        alpha: float = 16,
        dropout: float = 0.0,
        rslora: bool = False,
        lora_dtype=torch.float32,
        compute_dtype=None,
        init: str = "peft",
    ):
        super().__init__()
        self.backend = get_backend(backend) if isinstance(backend, str) else backend
        device, default_compute = placement(self.backend)
        self.device = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
        if len(q.shape) != 2:
            raise ValueError(f"QLoRALinear needs a 2-D (out, in) weight, got a Quantized4bit of shape {q.shape}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"LoRA rank r must be a positive int, got {r!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.q = q
        self.out_features, self.in_features = q.shape
        self.r, self.alpha, self.dropout, self.rslora = r, float(alpha), float(dropout), bool(rslora)
        self.scaling = self.alpha / math.sqrt(r) if rslora else self.alpha / r
        self.compute_dtype = as_torch_dtype(compute_dtype if compute_dtype is not None else default_compute)
        if self.device.type == "cuda" and self.compute_dtype == torch.float64:
            raise ValueError("float64 compute is for CPU gradient checks only; use bfloat16/float16/float32 on CUDA")
        lora_dtype = as_torch_dtype(lora_dtype)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=self.device, dtype=lora_dtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, device=self.device, dtype=lora_dtype))
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
            bias = bias.detach().to(self.device, self.compute_dtype)
        self.register_buffer("bias", bias)
        self.reset_lora_parameters(init)
        self.handle = ops.register(self)  # names this layer to the custom operators (torch.compile path)
        # decode: x W_hat^T by the backend's 4-bit matvec for 1..16 tokens without gradients (MV-1; cupy)
        self.matvec = self.backend.name == "cupy" and self.compute_dtype in (torch.bfloat16, torch.float32)
        self.step_seed = None  # a dropout.StepSeed: masks from device memory (LORA-8), capturable; None: host seeds
        self.seed_salt = 0  # this layer's salt under a StepSeed (use_step_seed sets it from the module's name)
        self._bound = None  # (scratch key, the buffer bound to, W_hat view into it, the bound dequantize launch)
        self._matvec: dict[int, tuple] = {}  # tokens -> (q, the backend's bound matvec launch), for decoding

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, backend="numpy", quant_type="nf4", blocksize=64, double_quant=True, **kw
    ):
        """Quantize an ``nn.Linear``'s weight with the backend (on the backend's device) and wrap it."""
        if type(linear) is not nn.Linear:
            raise TypeError(
                f"from_linear needs a torch.nn.Linear, got {type(linear).__module__}.{type(linear).__name__}"
            )
        be = get_backend(backend) if isinstance(backend, str) else backend
        w = linear.weight.detach()
        w = w.to(placement(be)[0])
        q = be.quantize_4bit(w.contiguous(), quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
        return cls(q, bias=linear.bias, backend=be, **kw)

    def reset_lora_parameters(self, init: str = "peft") -> None:
        """PEFT's default init ("peft"): A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0.

        "gaussian": A ~ N(0, 1/r), B = 0.  "random": both A and B nonzero (tests only: the LoRA term is then active).
        """
        with torch.no_grad():
            if init == "peft":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
                nn.init.zeros_(self.lora_B)
            elif init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / self.r)
                nn.init.zeros_(self.lora_B)
            elif init == "random":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
                nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
            else:
                raise ValueError(f"init must be 'peft', 'gaussian' or 'random', got {init!r}")

    # -- dequantization --

    def dequantized(self) -> torch.Tensor:
        """W_hat (out, in) in the compute dtype, written into the shared scratch buffer (valid until the next call).

        The backend's launch is bound once (kernel, launch configuration, arguments, the scratch address) and re-bound
        only when the shared buffer was re-allocated, so a call costs the launch and nothing else."""
        bound = self._bound
        if bound is None or current(bound[0]) is not bound[1]:
            bound = self._bind()
        bound[3]()
        return bound[2]

    def _bind(self):
        q, dt = self.q, self.compute_dtype
        key = scratch_key(self.device, dt if dt in DEQUANT_DTYPES else torch.float32)  # float64: via float32, exact
        W = scratch_buffer(q.n, self.device, key[1]).view(q.shape)
        launch = self.backend.bind_dequantize_4bit(q, W)
        if key[1] != dt:  # float64 (CPU gradient checks): the float32 values, widened exactly
            W64 = torch.empty(q.shape, dtype=dt, device=self.device)

            def launch(bound32=launch, W=W, W64=W64):
                bound32()
                W64.copy_(W)

            W = W64
        self._bound = (key, current(key), W, launch)
        return self._bound

    def dequantize_weight(self, dtype=None) -> torch.Tensor:
        """A fresh copy of W_hat (out, in) in ``dtype`` (default: the compute dtype), one rounding (BW-7)."""
        dt = as_torch_dtype(dtype) if dtype is not None else self.compute_dtype
        out = torch.empty(self.q.shape, device=self.device, dtype=dt if dt in DEQUANT_DTYPES else torch.float32)
        self.backend.dequantize_4bit(self.q, dtype=DTYPE_NAMES[out.dtype], out=out)
        return out.to(dt)

    def call_seed(self) -> int | None:
        """The dropout seed of one training call: None (no dropout), STEP_SEED (the StepSeed in device memory, the
        same for the forward, a checkpoint's recompute and the backward) or a fresh host seed (draw_dropout_seed)."""
        if not (self.training and self.dropout > 0.0):
            return None
        return STEP_SEED if self.step_seed is not None else draw_dropout_seed()

    def noise(self, shape, seed: int, dtype) -> torch.Tensor:
        """The dropout factor keep / (1 - p) of this layer's call with ``seed`` (LORA-3), redrawn in backward;
        ``seed == STEP_SEED``: LORA-8's mask from the step seed and this layer's salt."""
        if seed == STEP_SEED:
            keep = self.backend.dropout_keep_counter(shape, self.dropout, self.step_seed.tensor, self.seed_salt)
            return keep.to(dtype).mul_(keep_scale(self.dropout))
        return dropout_noise(shape, self.dropout, seed, self.backend, dtype)

    def dropout_factor(self, shape, seed: int, dtype):
        """The dropout of one call as functional.py takes it: under a StepSeed (``seed == STEP_SEED``) a CounterNoise,
        which the backend applies where it is used (one launch each, the mask never stored); else ``noise(...)``."""
        if seed == STEP_SEED:
            return CounterNoise(self)
        return self.noise(shape, seed, dtype)

    def merged_weight(self, dtype=torch.float32) -> torch.Tensor:
        """W' = T(W_hat + s * B A): W_hat in float32 (exact), the sum in float64, one rounding to T (LORA-6)."""
        with torch.no_grad():
            W64 = self.dequantize_weight(torch.float32).double()  # (out, in)
            BA = torch.mm(self.lora_B.double(), self.lora_A.double())  # (out, in)
            return round_f64(W64 + self.scaling * BA, as_torch_dtype(dtype))

    # -- forward --

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input's last dimension is {x.shape[-1]}, this layer takes {self.in_features}")
        if x.device.type != self.device.type:
            raise ValueError(f"input is on {x.device} but this layer's 4-bit weight is on {self.device}")
        in_dtype = x.dtype
        x = x.to(self.compute_dtype)
        if (
            self.matvec
            and x.numel() <= MATVEC_TOKENS * self.in_features
            and not self._needs_grad(x)
            and not torch.compiler.is_compiling()
        ):
            return self._decode(x).to(in_dtype)
        seed = self.call_seed()
        if torch.compiler.is_compiling():  # the custom operators: no graph break at this layer
            x2 = x.reshape(-1, self.in_features)
            s = -1 if seed is None else seed
            y, _ = ops.linear(x2, self.lora_A, self.lora_B, self.bias, self.handle, self.scaling, s)
            y = y.view(*x.shape[:-1], self.out_features)
        else:
            y = QLoRAFunction.apply(x, self.lora_A, self.lora_B, self, seed)
        return y.to(in_dtype)

    def _needs_grad(self, x) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or self.lora_A.requires_grad or self.lora_B.requires_grad)

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        """Decoding, 1..MATVEC_TOKENS rows, no gradient: y = matvec_4bit(x, q) + b + s (x A^T) B^T.  The matvec reads
        the packed 4-bit weight once (float32 sums, one rounding; any order, within MV-8's any-order bound), instead
        of writing W_hat and reading it back in a GEMM; the two paths agree to MV-8's bound, not bit for bit.  No
        host synchronisation or host-side allocation: a decode step can be captured."""
        x2 = x.reshape(-1, self.in_features).contiguous()
        y = torch.empty(x2.shape[0], self.out_features, dtype=self.compute_dtype, device=x.device)
        self._matvec_launch(x2.shape[0])(x2, y)
        y, _ = add_lora(y, x2, self.lora_A, self.lora_B, self.bias, self.scaling, None)
        return y.view(*x.shape[:-1], self.out_features)

    def _matvec_launch(self, tokens: int):
        """The backend's matvec of ``tokens`` rows in the compute dtype, bound once per token count and q
        (``bind_matvec_4bit``: a call is the launch; rebound when q is replaced, e.g. by a sharded base)."""
        bound = self._matvec.get(tokens)
        if bound is None or bound[0] is not self.q:
            name = DTYPE_NAMES[self.compute_dtype]
            launch = self.backend.bind_matvec_4bit(self.q, tokens, x_dtype=name, out_dtype=name, order="any")
            bound = self._matvec[tokens] = (self.q, launch)
        return bound[1]

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, {self.q.quant_type}, blocksize={self.q.blocksize}, "
            f"double_quant={self.q.double_quant}, r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, "
            f"dropout={self.dropout:g}, compute={DTYPE_NAMES[self.compute_dtype]}, "
            f"lora={DTYPE_NAMES[self.lora_A.dtype]}, backend={self.backend.name}"
        )
