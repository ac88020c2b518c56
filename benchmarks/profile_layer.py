"""Where one QLoRA layer's host time goes (4096x4096, 4096 tokens, bf16): per-piece host microseconds behind a long
GPU sleep (so the GPU never blocks the host), a cProfile of 50 forward+backward calls, and the bf16 peers.

    python benchmarks/profile_layer.py      # prints; the H200 run is benchmarks/results/profile_layer_H200.log
"""

import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch

from benchmarks.bench_layer import make_ours, make_peft

torch.backends.cuda.matmul.allow_tf32 = False


def host(fn, n=50, reps=7):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        torch.cuda._sleep(300_000_000)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        ts.append((time.perf_counter() - t0) / n * 1e6)
        torch.cuda.synchronize()
    return statistics.median(ts)


out_f, in_f, T = 4096, 4096, 4096
m = make_ours(out_f, in_f)
x = torch.randn(T, in_f, device="cuda", dtype=torch.bfloat16, requires_grad=True)
xn = x.detach()
dY = torch.randn(T, out_f, device="cuda", dtype=torch.bfloat16)
W = m.dequantized()
A, B = m.lora_A, m.lora_B
print("us: dequantized()", host(m.dequantized))
print("us: bound launch", host(m._bound[3]))
print("us: torch.mm", host(lambda: torch.mm(xn, W.t())))
print("us: torch.empty", host(lambda: torch.empty(10, device="cuda")))
print("us: fwd no_grad", host(lambda: m(xn)))
with torch.no_grad():
    print("us: fwd in no_grad ctx", host(lambda: m(xn)))


def fb():
    m(x).backward(dY)


print("us: fwd+bwd", host(fb))


def fonly():
    return m(x)


print("us: fwd (grad)", host(fonly))
ys = [m(x) for _ in range(60)]
it = iter(ys)
print("us: bwd only", host(lambda: next(it).backward(dY), n=7, reps=7))
# cuda graph warm: what python costs
pr = cProfile.Profile()
torch.cuda._sleep(2_000_000_000)
pr.enable()
for _ in range(50):
    fb()
pr.disable()
torch.cuda.synchronize()
s = io.StringIO()
pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
print(s.getvalue()[:6000])
pe = make_peft(out_f, in_f, quantized=False)


def fbp():
    pe(x).backward(dY)


print("us: peft bf16 fwd+bwd", host(fbp))
print("us: peft fwd", host(lambda: pe(x)))
lin = torch.nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=torch.bfloat16)


def fbl():
    lin(x).backward(dY)


print("us: plain Linear fwd+bwd", host(fbl))
