"""The non-finite check on the GPU (BW-9): at once (one status read-back), or deferred into a `FiniteFlag`.

check_finite(x) is qlora_ref.checks.check_finite: it raises NonFiniteError with the spec's message (count, first
index, value).  check_finite(x, flag=f) only queues the kernel, adding its count to f on the device; f is read once
per step (f.raise_if_nonfinite()), outside a captured CUDA graph, so the step itself never synchronises.
"""

from __future__ import annotations

import cupy as cp
import numpy as np

from backends.bridge import on_torch_stream
from qlora_ref.checks import NonFiniteError

from . import build, launch
from .inputs import first_index, input_view, new_status, nonfinite_error, read_status


class FiniteFlag:
    """A device-side count of non-finite values that `check_finite(x, flag=...)` adds to without reading it back.

    Queue the checks of a step into one flag, then read it once (``count()`` / ``raise_if_nonfinite()``: the one
    synchronisation), outside a captured region if the step is a CUDA graph; ``clear()`` zeroes it (an async memset,
    capturable).  Words: [0] count, [1] ~(smallest flat index seen, over every tensor checked).  Clearing and reading
    run on torch's current stream when torch has initialised CUDA (where its checks ran), else on CuPy's.
    """

    def __init__(self) -> None:
        self.device = cp.cuda.Device().id
        self.status = new_status()

    def _stream(self):
        import sys

        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            from backends.bridge import current_stream

            return current_stream(self.device)
        return cp.cuda.get_current_stream()

    def clear(self) -> None:
        with cp.cuda.Device(self.device):
            cp.cuda.runtime.memsetAsync(self.status.data.ptr, 0, self.status.nbytes, self._stream().ptr)

    def count(self) -> int:
        with cp.cuda.Device(self.device), self._stream():
            return int(read_status(self.status)[0])

    def raise_if_nonfinite(self, what: str = "input") -> None:
        """Raise qlora_ref.NonFiniteError saying how many values were non-finite since the last clear()."""
        count = self.count()
        if count:
            raise NonFiniteError(
                f"{what} has {count} non-finite value(s) (NaN/Inf) since the flag was cleared; "
                "check the tensors one by one (check_finite without a flag) to find the first"
            )


def check_finite(x, what: str = "input", *, kernel: str = "v2", flag: FiniteFlag | None = None) -> None:
    """qlora_ref.checks.check_finite on the GPU: raises NonFiniteError (same message) on NaN/Inf.

    With ``flag`` the check is only queued: its count is added to the flag on the device, nothing is read back.
    """
    with on_torch_stream(x):
        xv = input_view(x, what)
        n = xv.n
        if n == 0:
            return
        status = new_status() if flag is None else flag.status
        ctype = build.CTYPES[xv.dtype]
        if kernel == "v2" and xv.aligned:
            grid, block = launch.check_finite_v2_config(n, 4 if xv.dtype == "float32" else 2)
            k = build.kernel("check_finite.cu", f"check_finite_v2<{ctype}, {build.FINITE_CHUNKS}>")
            k(grid, block, (xv.arg, np.int64(n), np.int32(1), status))
        else:
            k = build.kernel("check_finite.cu", f"check_finite_v1<{ctype}>")
            k(*launch.check_finite_v1_config(n), (xv.arg, np.int64(n), status))
        if flag is not None:
            return
        st = read_status(status)
        if st[0]:
            raise nonfinite_error(xv, int(st[0]), first_index(st[1]), what)
