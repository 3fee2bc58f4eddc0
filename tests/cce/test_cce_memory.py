"""Peak memory of cut cross-entropy with bf16/fp16 inputs: nothing of V x D beyond the gradients.

Each measurement runs in a fresh Python process, as ``bench/cce.py`` does: after the inputs are
made (and the extension, the thread pool and BLAS are warmed up on a tiny vocabulary) the peak
resident set is reset through ``/proc/self/clear_refs`` and read back as ``VmHWM`` after one
forward+backward. The extra peak minus the gradients' own (N + V) D elements in the input dtype
is what the pass itself holds. With a fixed row block it may grow with V only by one R x V float32
logits block and one float32 piece of C (the piece is at most one block's size); the test compares
V = 8,192 with V = 65,536 and allows a quarter of one float32 V x D copy of the larger classifier
(32 MiB against the 7 MiB that block and piece grow by), so that any whole-vocabulary temporary --
a float32 (or float64) copy of C, a float32 dC accumulator, even a bf16 copy of C (56 MiB more) --
fails it.

The child runs with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB: every larger block is then
mapped on allocation and unmapped on free, so the resident set follows the live tensors. With
glibc's adaptive threshold, freed blocks of up to 32 MiB may stay resident in its heap, and how many
depends on the heap's layout (address randomisation): a few MiB to tens of MiB from run to run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lossbench.cce import checks, ext

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter: argv = impl, dtype, N, D, V, rows_per_block.
# Prints one JSON line: {"skip": reason} or {"beyond_grads": MiB, "extra": MiB}.
CHILD = r"""
import json, sys
import torch
from lossbench.cce import api, linear_cross_entropy

impl, dtype = sys.argv[1], getattr(torch, sys.argv[2])
N, D, V, R = (int(x) for x in sys.argv[3:7])

# the bench's own probes (peak RSS via /proc/self/clear_refs + VmHWM), loaded from bench/cce.py
import importlib.util
spec = importlib.util.spec_from_file_location("bench_cce", "bench/cce.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

def status(field):
    return bench.rss_mib(field) * 2 ** 20

reset_peak = bench.reset_peak_rss

if not reset_peak():
    print(json.dumps({"skip": "/proc/self/clear_refs is not writable"}))
    sys.exit(0)
if api.resolve_impl(impl, torch.device("cpu")) != impl:
    print(json.dumps({"skip": f"impl {impl!r} unavailable"}))
    sys.exit(0)
g = torch.Generator().manual_seed(0)
# warm-up on a tiny vocabulary: thread pool, BLAS buffers, lazy initialisation
e = torch.randn(N, D, generator=g).to(dtype).requires_grad_()
c = (torch.randn(256, D, generator=g) / D ** 0.5).to(dtype).requires_grad_()
linear_cross_entropy(e, c, torch.randint(0, 256, (N,), generator=g), impl=impl,
                     rows_per_block=R).backward()
del e, c
E = torch.randn(N, D, generator=g).to(dtype).requires_grad_()
C = (torch.randn(V, D, generator=g) / D ** 0.5).to(dtype).requires_grad_()
t = torch.randint(0, V, (N,), generator=g)
base = status("VmRSS")
reset_peak()
linear_cross_entropy(E, C, t, impl=impl, rows_per_block=R).backward()
extra = status("VmHWM") - base
grads = (N + V) * D * E.element_size()
assert E.grad.dtype == dtype and C.grad.dtype == dtype
print(json.dumps({"extra": extra / 2 ** 20, "beyond_grads": (extra - grads) / 2 ** 20}))
"""


def beyond_grads_mib(impl: str, dtype: str, N: int, D: int, V: int, R: int) -> float:
    """Extra peak MiB of one forward+backward beyond the gradients, in a fresh process."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", CHILD, impl, dtype, str(N), str(D), str(V), str(R)],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    assert out.returncode == 0 and lines, f"child failed: {out.stderr[-2000:]}"
    res = json.loads(lines[-1])
    if "skip" in res:
        pytest.skip(res["skip"])
    return float(res["beyond_grads"])


IMPLS = ["ext"] if ext.load() is not None else []


@pytest.mark.slow  # two fresh processes, a few seconds each
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc/self (Linux)")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_extra_memory_does_not_grow_with_vocab_times_width(impl, dtype):
    N, D, R = 128, 512, 16
    small, large = 8192, 65536
    grow = (beyond_grads_mib(impl, dtype, N, D, large, R)
            - beyond_grads_mib(impl, dtype, N, D, small, R))
    mib = 2 ** 20
    # allowed: one R x V float32 logits block and one float32 piece of C (at most as large) more
    inherent = 2 * R * (large - small) * 4 / mib  # 7 MiB
    bound = 0.25 * large * D * 4 / mib  # a quarter of a float32 copy of C: 32 MiB
    assert inherent < bound
    assert grow < bound, (f"extra memory beyond the gradients grew by {grow:.1f} MiB from "
                          f"V = {small} to {large} (allowed: {bound:.0f} MiB; one block and one "
                          f"piece of C: {inherent:.1f} MiB)")


# ---- the finiteness check's float64 sum, a piece at a time ------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(37, 5), (1000,), (3, 11, 7)])
def test_float64_sum_in_pieces_equals_the_whole_sum(dtype, shape, monkeypatch):
    monkeypatch.setattr(checks, "FINITE_SUM_PIECE", 16)  # many pieces, a short last one
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype)
    for y in (x, x.transpose(0, -1)):  # contiguous and strided
        got = checks._float64_sum(y)
        assert got.dtype == torch.float64
        assert torch.allclose(got, y.sum(dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_finiteness_check_in_pieces_finds_a_value_in_the_last_piece(bad, monkeypatch):
    monkeypatch.setattr(checks, "FINITE_SUM_PIECE", 64)
    C = torch.randn(101, 8).to(torch.bfloat16)
    C[-1, -1] = bad
    with pytest.raises(ValueError, match="weight"):
        checks._check_finite(C, "weight")
    checks._check_finite(C[:-1], "weight")  # the rest is finite
