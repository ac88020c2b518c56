"""Stepping inside backward (``PagedAdamW.hook_into_backward``): a few tensors at a time, no host synchronisation.

Each trainable tensor p_i is stepped soon after autograd has accumulated its gradient (a post-accumulate-grad hook):
the hooks gather up to ``group`` tensors (16 by default; a LLaMA layer has 14) and step them in one launch, then free
their gradients, so at most a group's gradients coexist on the device, and a group costs one launch, one check and one
table upload instead of one each per tensor (the host work that bounds the step).  What is gathered is stepped at the
end of each autograd graph task too.  Under check_finite="deferred" the spec's non-finite check (ADAMW-12) is kept per
group, on the device, and read back without waiting:

    flag[k] <- 1 if a gradient of group k holds NaN/Inf else 0    queued on the stream; the group's step kernel
                                                       reads flag[k] and writes nothing (its p, m, v untouched) when set
    end of each autograd graph task:  flag -> a pinned host copy, an event recorded behind it
    each later hook:  the copies the GPU has passed are read (event.query(): no wait); before p_i is stepped again,
                      the copy covering its last step is read (waiting for work queued a whole forward earlier)
    a set flag:       those tensors' step counts are undone and NonFiniteError is raised (out of loss.backward());
                      the other groups were stepped, as their hooks ran

So a bad gradient never writes a value, and is reported at the latest by the next backward (or at once by
``raise_if_nonfinite()`` / ``state_dict()``, which wait).  check_finite=True checks each group's gradients with one host
synchronisation per group (the spec's raise-before-write, at one wait per launch); False checks nothing.

overlap (CUDA, off by default: on the H200's 65B-shaped step it measured slower, 1.19 against 1.08 s, the AdamW
kernels reading host memory beside the GEMMs; benchmarks/bench_65b.py): the steps run on a side stream that first
waits for the gradient's stream, so the AdamW kernels (which cross the bus when the states are host-placed,
``placement="host"``) run beside the rest of backward instead of in line with it; each gradient is recorded on the
side stream before it is freed (its memory is not reused early), and at the end of each graph task the caller's
stream waits for the side stream, so whatever runs after ``backward()`` (the next forward) reads the updated
parameters. Under re-entrant checkpointing each block's recompute is a graph task of its own, so the join is per
block there. The values are the same bits either way: the same kernel, on the same data, in the same order per
tensor.
"""

from __future__ import annotations

from collections import deque

import torch

from qlora_ref.checks import NonFiniteError


class _Copy:
    """Steps (tensor index -> (its step count, the flag slot its launch read)) whose flags one host copy holds, and
    the event behind the copy."""

    __slots__ = ("entries", "event")

    def __init__(self):
        self.entries: dict[int, tuple[int, int]] = {}
        self.event = None  # torch.cuda.Event once copied (None on the CPU: the flags are the copy)


class InBackwardSteps:
    """The hooks of one optimizer (``opt``: a PagedAdamW) and their deferred checks (module docstring)."""

    def __init__(self, opt, *, overlap: bool = False, group: int = 16):
        if isinstance(group, bool) or not isinstance(group, int) or group < 1:
            raise ValueError(f"group must be a positive int (tensors per launch), got {group!r}")
        self.opt = opt
        device = opt.device
        self.cuda = device.type == "cuda"
        self.deferred = opt.check_finite == "deferred"
        n = len(opt._params)
        self.flags = torch.zeros(n, dtype=torch.int32, device=device)
        self.views = [self.flags[i : i + 1] for i in range(n)]  # each tensor's own flag, the kernel's `skip`
        self.host = torch.zeros(n, dtype=torch.int32, pin_memory=True) if self.cuda else self.flags
        self.host_np = self.host.numpy()
        self.side = torch.cuda.Stream(device) if self.cuda and overlap else None
        self.open = _Copy()  # stepped in the running graph task, not yet copied
        self.copies: deque[_Copy] = deque()  # copied, not yet read, oldest first
        self.unread: dict[int, _Copy] = {}  # tensor index -> the copy (or open) that holds its last step's flag
        self.queued: set[int] = set()  # graph tasks whose end callback is queued
        self.group = group
        self.batch: list[tuple[torch.Tensor, int]] = []  # (param, index) hooked, not yet stepped

    def hook(self, p: torch.Tensor) -> None:
        i = self.opt._index[id(p)]
        if any(j == i for _, j in self.batch):  # hooked twice before a flush: step what came first
            self.flush()
        if self.deferred:
            self.poll(i)
        self.batch.append((p, i))
        if len(self.batch) >= self.group:
            self.flush()
        self._at_task_end()

    def flush(self) -> None:
        """Step the gathered tensors in one launch and free their gradients."""
        if not self.batch:
            return
        batch, self.batch = self.batch, []
        params, index = [p for p, _ in batch], [i for _, i in batch]
        slot = index[0]  # the group's flag: a NaN/Inf in any of its gradients leaves all of them unstepped
        skip = self.views[slot] if self.deferred else None
        if self.side is not None:
            self.side.wait_stream(torch.cuda.current_stream(self.opt.device))
            with torch.cuda.stream(self.side):
                counts = self.opt._step_tensors(params, index, skip)
            for p in params:
                p.grad.record_stream(self.side)
        else:
            counts = self.opt._step_tensors(params, index, skip)
        for p in params:
            p.grad = None
        if self.deferred:
            for i, t in zip(index, counts, strict=True):
                self.open.entries[i] = (t, slot)
                self.unread[i] = self.open

    def _at_task_end(self) -> None:
        task = torch._C._current_graph_task_id()
        if task < 0:  # not inside backward (a direct call): finish at once
            self.end_task()
        elif task not in self.queued:
            self.queued.add(task)

            def done(task=task):
                self.queued.discard(task)
                self.end_task()

            torch.autograd.Variable._execution_engine.queue_callback(done)

    def end_task(self) -> None:
        """At the end of a graph task, on the caller's stream: step what is gathered, join the side stream, copy the
        flags to the host."""
        self.flush()
        if self.open.entries:
            self._copy()  # joins the side stream first
        elif self.side is not None:
            torch.cuda.current_stream(self.opt.device).wait_stream(self.side)
        self.opt.maybe_page_out()

    def _copy(self) -> None:
        copy, self.open = self.open, _Copy()
        if self.cuda:
            if self.side is not None:
                torch.cuda.current_stream(self.opt.device).wait_stream(self.side)
            self.host.copy_(self.flags, non_blocking=True)
            copy.event = torch.cuda.Event()
            copy.event.record()
        self.copies.append(copy)

    def poll(self, i: int | None = None, wait: bool = False) -> None:
        """Read every copy the GPU has passed (all of them with ``wait``, and the one holding tensor i's last step);
        raise NonFiniteError, undoing the skipped steps' counts, if a flag read is set."""
        held = self.unread.get(i) if i is not None else None
        if held is self.open or (wait and self.open.entries):
            self._copy()
        bad = []
        while self.copies:
            copy = self.copies[0]
            if copy.event is not None and not copy.event.query():
                if not (wait or held is not None):
                    break
                copy.event.synchronize()
            self.copies.popleft()
            for j, (t, slot) in copy.entries.items():
                if self.unread.get(j) is copy:
                    del self.unread[j]
                if self.host_np[slot]:
                    bad.append((j, t))
            if copy is held:
                held = None
        if bad:
            params = self.opt._params
            for j, t in bad:
                self.opt.state[params[j]]["step"] = t - 1
            names = ", ".join(str(j) for j, _ in bad[:8]) + (" ..." if len(bad) > 8 else "")
            raise NonFiniteError(
                f"the gradients of {len(bad)} tensor(s) (optimizer index {names}) held NaN/Inf in an earlier backward "
                "(check_finite='deferred', stepping inside backward): those tensors were not stepped and their step "
                "counts are undone; the others were stepped. Skip the batch, lower the learning rate, or find where "
                "the NaN comes from"
            )

    def drain(self) -> None:
        """Read every outstanding flag, waiting for the GPU as needed (raise_if_nonfinite, state_dict)."""
        self.flush()
        if self.deferred:
            self.poll(wait=True)
