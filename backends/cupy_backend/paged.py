"""One arena of optimizer state on a GPU: CUDA managed memory that pages between device and host, or device memory.

Paging (SPEC-NOTES 1.9; GPU-NOTES "managed memory"): `page_out` migrates the arena to host memory with
``cudaMemPrefetchAsync`` (a ``cudaMemLocation`` on CUDA 13), `page_in` brings it back.  Safety: the arena is
allocated, and paged in, only when ``cudaMemGetInfo`` shows its size plus a margin free; otherwise a
``DeviceMemoryError`` says how much was needed and how much was free (never oversubscribe the card).

Host placement (``placement="host"``): the arena stays in host memory for good — managed memory advised
``cudaMemAdviseSetPreferredLocation`` = host and ``cudaMemAdviseSetAccessedBy`` = the GPU, zeroed by the CPU (first
touch: the pages are born in host memory) — and kernels reach it across the bus through the GPU's mapping.  No device
memory is ever taken: this is what lets a 65B-shaped model's 6.4 GB of AdamW state sit beside 34 GB of 4-bit weights
under a 38 GB budget (benchmarks/bench_memory.py).

Unpaged (``paged=False``): plain device memory from torch's caching allocator when torch is loaded (so it shows in
torch's accounting and torch's cached blocks are returned before a refusal), else from CuPy's.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable

import cupy

from ..adamw_state import DeviceMemoryError
from ..bridge import current_stream


def stream_for(device_id: int):
    """torch's current stream on the device when torch is loaded (the caller's tensors live there), else CuPy's."""
    if "torch" in sys.modules:
        return current_stream(device_id)
    with cupy.cuda.Device(device_id):
        return cupy.cuda.get_current_stream()


def _location(device_id: int | None):
    """A cudaMemLocation (CUDA 13's argument of prefetch and advise): device `device_id`, or the host when None."""
    from cuda.bindings import runtime as cudart

    loc = cudart.cudaMemLocation()
    if device_id is None:
        loc.type = cudart.cudaMemLocationType.cudaMemLocationTypeHost
        loc.id = 0
    else:
        loc.type = cudart.cudaMemLocationType.cudaMemLocationTypeDevice
        loc.id = device_id
    return loc


def prefetch(ptr: int, nbytes: int, device_id: int | None, stream_ptr: int) -> None:
    """cudaMemPrefetchAsync to device `device_id` (None: the host) on a stream; CUDA 13 takes a cudaMemLocation."""
    from cuda.bindings import runtime as cudart

    loc = _location(device_id)
    try:
        (err,) = cudart.cudaMemPrefetchAsync(ptr, nbytes, loc, 0, stream_ptr)
    except TypeError:  # cuda-bindings 12.x: (ptr, count, dstDevice, stream)
        dst = cudart.cudaCpuDeviceId if device_id is None else device_id
        (err,) = cudart.cudaMemPrefetchAsync(ptr, nbytes, dst, stream_ptr)
    if err != cudart.cudaError_t.cudaSuccess:
        where = "host" if device_id is None else f"cuda:{device_id}"
        raise RuntimeError(f"cudaMemPrefetchAsync of {nbytes} bytes to {where} failed: {err}")


def advise(ptr: int, nbytes: int, advice: str, device_id: int | None) -> None:
    """cudaMemAdvise(ptr, nbytes, cudaMemAdvise<advice>, device `device_id` or the host when None)."""
    from cuda.bindings import runtime as cudart

    adv = getattr(cudart.cudaMemoryAdvise, f"cudaMemAdvise{advice}")
    loc = _location(device_id)
    try:
        (err,) = cudart.cudaMemAdvise(ptr, nbytes, adv, loc)
    except TypeError:  # cuda-bindings 12.x: an int device (cudaCpuDeviceId for the host)
        (err,) = cudart.cudaMemAdvise(ptr, nbytes, adv, cudart.cudaCpuDeviceId if device_id is None else device_id)
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"cudaMemAdvise({advice}) of {nbytes} bytes failed: {err}")


def check_host_room(need: int) -> None:
    """Refuse host placement when MemAvailable (Linux /proc/meminfo) is short of the arena plus 1 GiB."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()}
    except OSError:
        return
    avail = info.get("MemAvailable")
    if avail is not None and avail < need + (1 << 30):
        raise DeviceMemoryError(
            f"cannot place {need / 2**20:.1f} MiB of optimizer state in host memory: {avail / 2**20:.1f} MiB "
            "available (1 GiB kept as a margin). Use state_bits=8 or placement='device'."
        )


class StateArena:
    """``nbytes`` of zeroed memory at ``base`` (``mem``: its CuPy MemoryPointer) for GPU ``device_id``."""

    def __init__(self, nbytes: int, device_id: int, *, paged: bool, placement: str, margin_bytes: int | None,
                 free_memory_fn: Callable[[], int] | None):  # fmt: skip
        self.nbytes = nbytes
        self.device_id = device_id
        self.pageable = paged
        self.on_host = placement == "host"
        self._free_fn = free_memory_fn
        self._torch_buffer = None
        with cupy.cuda.Device(device_id):
            _, total = cupy.cuda.runtime.memGetInfo()
            self.margin = int(margin_bytes) if margin_bytes is not None else max(256 << 20, total // 50)
            stream = stream_for(device_id)
            if self.on_host:
                check_host_room(nbytes)
                self.mem = cupy.cuda.malloc_managed(nbytes)
                self.base = int(self.mem.ptr)
                advise(self.base, nbytes, "SetPreferredLocation", None)
                advise(self.base, nbytes, "SetAccessedBy", device_id)
                ctypes.memset(self.base, 0, nbytes)  # first touch by the CPU: the pages are born in host memory
            elif paged:
                self.check_room(nbytes, "allocate")
                self.mem = cupy.cuda.malloc_managed(nbytes)
                self.base = int(self.mem.ptr)
                prefetch(self.base, nbytes, device_id, stream.ptr)
            else:
                self.check_room(nbytes, "allocate")
                self.mem = self._device_memory(nbytes)
                self.base = int(self.mem.ptr)
            if not self.on_host:
                cupy.cuda.runtime.memsetAsync(self.base, 0, nbytes, stream.ptr)
        self.resident = not self.on_host

    def _device_memory(self, nbytes: int):
        torch = sys.modules.get("torch")
        if torch is None:
            return cupy.cuda.alloc(nbytes)
        self._torch_buffer = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{self.device_id}")
        ptr = self._torch_buffer.data_ptr()
        return cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(ptr, nbytes, self._torch_buffer, self.device_id), 0)

    # -- free memory ------------------------------------------------------------------------------------------------

    def free_bytes(self) -> int:
        """cudaMemGetInfo's free bytes, or free_memory_fn's answer when that is smaller."""
        with cupy.cuda.Device(self.device_id):
            real = int(cupy.cuda.runtime.memGetInfo()[0])
        return real if self._free_fn is None else min(real, int(self._free_fn()))

    def check_room(self, need: int, what: str) -> None:
        free = self.free_bytes()
        torch = sys.modules.get("torch")
        if free < need + self.margin and torch is not None and torch.cuda.is_initialized():
            torch.cuda.empty_cache()  # return torch's cached blocks before refusing
            free = self.free_bytes()
        if free < need + self.margin:
            raise DeviceMemoryError(
                f"cannot {what} {need / 2**20:.1f} MiB of optimizer state on cuda:{self.device_id}: "
                f"{free / 2**20:.1f} MiB free, and {self.margin / 2**20:.1f} MiB is kept as a margin. "
                "Free device memory (smaller batch, page_out() elsewhere) or use state_bits=8."
            )

    # -- paging -------------------------------------------------------------------------------------------------------

    def location(self) -> str:
        """Where the driver last prefetched the arena: "host" or "device" ("device" unpaged, "host" host-placed).

        On CUDA 13 / driver 580 cudaMemGetInfo does not report the device memory of a paged-out arena as free (the
        driver keeps the chunks until something else claims them), so this attribute, not the free memory, is what
        shows a page-out happened.
        """
        if not self.pageable:
            return "device"
        if self.on_host:
            return "host"
        from cuda.bindings import runtime as cudart

        # the int-valued attribute (device id, or cudaCpuDeviceId = -1 for the host); cuda-bindings 13.3 refuses
        # the newer ...LastPrefetchLocationType in its Python helper
        attr = cudart.cudaMemRangeAttribute.cudaMemRangeAttributeLastPrefetchLocation
        err, data = cudart.cudaMemRangeGetAttribute(4, attr, self.base, self.nbytes)
        if err != cudart.cudaError_t.cudaSuccess:
            raise RuntimeError(f"cudaMemRangeGetAttribute(LastPrefetchLocation) failed: {err}")
        where = int(data[0] if isinstance(data, (list, tuple)) else data)
        if where == int(cudart.cudaCpuDeviceId):
            return "host"
        return "device" if where == self.device_id else f"location {where}"

    def page_out(self, sync: bool = True) -> None:
        if not self.pageable:
            raise ValueError("page_out() needs paged=True (states in managed memory)")
        if not self.resident or self.on_host:
            return
        stream = stream_for(self.device_id)
        prefetch(self.base, self.nbytes, None, stream.ptr)
        if sync:
            stream.synchronize()
        self.resident = False

    def page_in(self) -> None:
        if self.resident or self.on_host:  # host placement: kernels read the states where they are
            return
        self.check_room(self.nbytes, "page in")
        prefetch(self.base, self.nbytes, self.device_id, stream_for(self.device_id).ptr)
        self.resident = True
