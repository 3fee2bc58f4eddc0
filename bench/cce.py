"""Cut cross-entropy: speed and memory of forward+backward against the alternatives.

    python bench/cce.py                      # N=8192, D=512, V in {32768, 131072}, CPU
    python bench/cce.py --quick              # N=2048, V=32768, one timed run
    python bench/cce.py --vocab 32768 --device cuda

Each case runs in a fresh subprocess: it creates E (N x D), C (V x D) and targets, runs one
warm-up forward+backward, then ``--reps`` timed ones (median reported). Peak memory is the
process's peak resident set (CPU; reset through /proc/self/clear_refs, else ru_maxrss) or
``torch.cuda.max_memory_allocated`` (CUDA), minus what it held after creating the inputs, so it
includes the gradients. The float32 GEMM rate is measured in the same run; the GEMM bound is four
GEMMs of 2*N*V*D FLOPs at that rate, and "of bound" = bound / time (above 100% means fewer than
four GEMMs' worth of time); in brackets the same with the rate measured inside that case's own
process between its timed runs (the CPU may be shared: the load average is printed per case).
"vs best alt" = time / fastest alternative's time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OURS = ["lossbench ext", "lossbench torch"]
ALTERNATIVES = ["F.cross_entropy(E @ C.T)", "F.linear_cross_entropy default",
                "F.linear_cross_entropy auto chunks", "F.linear_cross_entropy 512-row chunks",
                "apple cut-cross-entropy torch_compile"]


def rss_mib(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def make_case(name: str):
    import torch
    import torch.nn.functional as F

    if name == "F.cross_entropy(E @ C.T)":
        return lambda E, C, t: F.cross_entropy(E @ C.t(), t)
    if name.startswith("F.linear_cross_entropy"):
        if not hasattr(F, "linear_cross_entropy"):
            return None
        opts = None
        if "auto" in name:
            opts = torch.nn.LinearCrossEntropyOptions()
        elif "512-row" in name:
            opts = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=512, chunking_method=None)
        return lambda E, C, t: F.linear_cross_entropy(E, C, t, options=opts)
    if name.startswith("apple"):
        try:
            from cut_cross_entropy import linear_cross_entropy as apple
        except Exception:
            return None
        return lambda E, C, t: apple(E, C, t, impl="torch_compile")
    if name.startswith("lossbench"):
        from lossbench.cce import linear_cross_entropy

        impl = name.split()[-1]
        return lambda E, C, t: linear_cross_entropy(E, C, t, impl=impl)
    raise ValueError(f"unknown case {name!r}")


def worker(args) -> None:
    import torch

    device = torch.device(args.device)
    fn = make_case(args.case)
    if fn is None:
        print(json.dumps({"case": args.case, "skipped": "not available"}))
        return
    if args.case == "lossbench ext":
        from lossbench.cce import api

        if api.resolve_impl("ext", device) != "ext":
            print(json.dumps({"case": args.case, "skipped": "extension unavailable"}))
            return
    gen = torch.Generator().manual_seed(0)
    E = torch.randn(args.n, args.d, generator=gen).to(device).requires_grad_()
    C = (torch.randn(args.v, args.d, generator=gen) / args.d ** 0.5).to(device).requires_grad_()
    t = torch.randint(0, args.v, (args.n,), generator=gen).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    bufs = gemm_buffers(args.device, args.n, args.d)

    def step():
        E.grad = C.grad = None
        sync()
        t0 = time.perf_counter()
        fn(E, C, t).backward()
        sync()
        return time.perf_counter() - t0

    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = rss_mib("VmRSS")
        cleared = reset_peak_rss()
    times, rates = [], []
    step()  # warm-up
    for _ in range(args.reps):
        rates.append(gemm_rate(bufs, reps=2))
        times.append(step())
    if device.type == "cuda":
        extra = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    else:
        peak = (rss_mib("VmHWM") if cleared
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        extra = peak - base
    print(json.dumps({"case": args.case, "time": statistics.median(times), "times": times,
                      "extra_mib": extra, "gemm_rate": statistics.median(rates),
                      "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")}))


def gemm_buffers(device_name: str, n: int, d: int):
    """Operands and output of the probe GEMM, allocated once (so probing allocates nothing)."""
    import torch

    device = torch.device(device_name)
    a = torch.randn(min(n, 2048), d, device=device)
    b = torch.randn(8192, d, device=device)
    return a, b, torch.zeros(a.shape[0], b.shape[0], device=device)  # pages touched now


def gemm_rate(bufs, reps: int = 5) -> float:
    """Best float32 GEMM rate (FLOP/s) over a few reps of an (n x d) @ (d x 8192) product."""
    import torch

    a, b, out = bufs
    sync = torch.cuda.synchronize if a.is_cuda else (lambda: None)
    best = float("inf")
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        torch.mm(a, b.t(), out=out)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * a.shape[0] * b.shape[0] * a.shape[1] / best


def run_case(case: str, n: int, d: int, v: int, device: str, reps: int, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", case, "--n", str(n), "--d", str(d),
           "--vocab", str(v), "--device", device, "--reps", str(reps)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"case": case, "skipped": f"timed out after {timeout:.0f} s"}
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    err = (out.stderr.strip().splitlines() or ["no output"])[-1]
    return {"case": case, "skipped": f"failed: {err[:120]}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=None, help="rows N (default 8192; quick 2048)")
    parser.add_argument("--d", type=int, default=512, help="feature width D")
    parser.add_argument("--vocab", type=int, nargs="*", default=None,
                        help="class counts V (default 32768 131072; quick 32768)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--reps", type=int, default=None, help="timed runs after a warm-up")
    parser.add_argument("--quick", action="store_true", help="small, one timed run")
    parser.add_argument("--cases", nargs="*", default=None, help="subset of case names")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per case")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.case, args.v = args.worker, args.vocab[0]
        worker(args)
        return

    n = args.n or (2048 if args.quick else 8192)
    vocab = args.vocab or ([32768] if args.quick else [32768, 131072])
    reps = args.reps or (1 if args.quick else 3)
    cases = args.cases or (OURS + ALTERNATIVES)
    # Build the extension once up front so that no case times a compilation.
    subprocess.run([sys.executable, "-m", "lossbench.cce.build"], cwd=ROOT, check=False,
                   capture_output=True)
    rate = gemm_rate(gemm_buffers(args.device, n, args.d))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device {args.device}, N={n}, D={args.d}, float32, fwd+bwd, median of {reps} after "
          f"a warm-up; float32 GEMM rate {rate / 1e9:.0f} GFLOP/s; load average {load:.1f}; "
          f"{os.cpu_count()} CPUs\n")
    for v in vocab:
        bound = 4 * 2 * n * v * args.d / rate
        rows = [run_case(c, n, args.d, v, args.device, reps, args.timeout) for c in cases]
        alt = [r["time"] for r in rows if r["case"] in ALTERNATIVES and "time" in r]
        alt_mem = [r["extra_mib"] for r in rows if r["case"] in ALTERNATIVES and "time" in r]
        best = min(alt) if alt else float("nan")
        mat = next((r["extra_mib"] for r in rows if r["case"] == ALTERNATIVES[0] and "time" in r),
                   float("nan"))
        print(f"V={v}: 4-GEMM bound {bound:.2f} s; best alternative {best:.2f} s, "
              f"least alternative extra memory {min(alt_mem) if alt_mem else float('nan'):.0f} MiB")
        print("| impl | time (s) | extra peak MiB | % of materialized | vs best alt "
              "| of GEMM bound (run's own rate) | GEMM GFLOP/s in run | load avg |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            if "time" not in r:
                print(f"| {r['case']} | {r['skipped']} | | | | | | |")
                continue
            own = 4 * 2 * n * v * args.d / r["gemm_rate"]
            print(f"| {r['case']} | {r['time']:.3g} | {r['extra_mib']:.0f} | "
                  f"{100 * r['extra_mib'] / mat:.1f}% | {r['time'] / best:.2f}x | "
                  f"{100 * bound / r['time']:.0f}% ({100 * own / r['time']:.0f}%) | "
                  f"{r['gemm_rate'] / 1e9:.0f} | {r['load']:.1f} |")
        print(flush=True)


if __name__ == "__main__":
    main()
