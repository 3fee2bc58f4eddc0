"""Cut cross-entropy: speed and memory of forward+backward against the alternatives.

    python bench/cce.py --suite          # docs/cce.md's tables, targets met or missed under each
    python bench/cce.py --suite --parts dense peaked --rounds 3   # some parts only
    python bench/cce.py --suite --smoke  # the same cases on tiny shapes: checks every path runs
    python bench/cce.py --suite --out <folder>   # keeps each finished case-round; rerun resumes
    python bench/cce.py                  # dense, N=8192, D=512, V in {32768, 131072}, CPU
    python bench/cce.py --kind peaked --vocab 32768
    python bench/cce.py --dtype bfloat16 --cases "lossbench ext" --vocab 8192 32768
    python bench/cce.py --cases "lossbench ext" "lossbench ext rows=512" --rounds 3   # a row block

Each case runs in a fresh subprocess: it creates E (N x D), C (V x D) and targets, runs one
warm-up forward+backward, then ``--reps`` timed ones (median reported). ``--rounds`` repeats that
in alternating rounds (the cases in order, then in reverse order, ...; 3 by default with
``--suite``) and reports the median over the rounds beside every round's time, so that neither a
drift of the machine nor the position in the table favours a case. Peak memory is the
process's peak resident set (CPU; reset through /proc/self/clear_refs, else ru_maxrss) or
``torch.cuda.max_memory_allocated`` (CUDA), minus what it held after creating the inputs, so it
includes the gradients ("beyond grads" subtracts their size, (N + V) D elements). The float32
GEMM rate is measured in the same run; "of 3-GEMM bound" = (three GEMMs of 2 N V D FLOPs at that
rate) / time; in brackets the same with the rate measured inside that case's own process between
its timed runs (the CPU may be shared: the largest load average over the rounds is printed per
case). "vs best alt" = time / fastest alternative's time in the same table. A case that
materialises the N x V logits is not run where about three N x V float32 tensors would not fit in
the memory the kernel reports as available (V = 262,144 at N = 8,192 needs ~24 GiB); its row
says so. The float32 tables end with a floor that is not an implementation: the three GEMMs
alone over 512-row blocks, no softmax (the least time of any implementation running them so).
Under each float32 table the suite prints the targets (dense: <= 0.95x the best
alternative's time and the least extra memory; peaked: >= 1.5x faster) as met or missed.

Inputs. ``dense``: E ~ N(0, 1), C ~ N(0, 1/D), uniform targets (softmax spread over all classes,
nothing to filter). ``peaked`` (shaped like a trained large-vocabulary model): class j has
frequency f_j ~ (rank_j + 1)^-1.1 with ranks a random permutation of the class ids; targets are
drawn from f (Zipf); with a unit direction u and R ~ N(0, 1/D) orthogonal to u,
C_j = 3 log(f_j / f_max) u + 3 R_j and E_i = (1 + 0.1 xi_i) u + 1.5 R_{y_i} + 0.1 n_i
(xi, n standard normal), so the logits carry a Zipf prior 3 log f_j plus a target-aligned term
and the softmax puts most of its mass on a few classes (the bound check prints how much).

Alternatives: ``F.cross_entropy`` on materialised logits, torch's ``F.linear_cross_entropy``
(three chunkings) and, when it is installed (``pip install cut-cross-entropy==25.1.1 --no-deps``),
apple's ``cut_cross_entropy.linear_cross_entropy(..., impl="torch_compile")`` -- its Triton
kernels need a GPU; without the package its column is left out with a note.

The LLM-shaped case (Gemma-2-like head: D = 2,304, V = 256,000, peaked inputs, float32) runs
every implementation at N = 2,048: the materialised-logits baselines hold the 2 GiB N x V logits
about three times over (logits, log-softmax, their gradient) beside the 2.2 GiB classifier and its
gradient, about 11 GiB in all, which fits a 24 GiB machine; N = 4,096 would need about 17 GiB.
Each of its steps is ~7 TFLOP of GEMMs (about a minute at 150 GFLOP/s), so allow 30-45 minutes.
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
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OURS = ["lossbench ext", "lossbench ext unsorted", "lossbench torch"]
APPLE = "apple cut-cross-entropy torch_compile"
#: apple's Triton kernels (CUDA only): the implementation the paper times.
APPLE_TRITON = "apple cut-cross-entropy cce"
APPLE_INSTALL = "pip install cut-cross-entropy==25.1.1 --no-deps"
ALTERNATIVES = ["F.cross_entropy(E @ C.T)", "F.linear_cross_entropy default",
                "F.linear_cross_entropy auto chunks", "F.linear_cross_entropy 512-row chunks",
                APPLE, APPLE_TRITON]
# LLM-shaped case (Gemma 2 2B's head, as in the paper's Table 1): D, V, and the N that lets the
# materialised-logits baselines fit beside the classifier on a 24 GiB machine (module docstring).
LLM_SHAPE = {"n": 2048, "d": 2304, "v": 256000}
#: Not an implementation: the three GEMMs alone (logits, dE, dC) over 512-row blocks with no softmax
#: pass -- the floor of any implementation that runs those GEMMs at that block size (ours, torch's chunks).
FLOOR = "floor: 3 bare GEMMs, 512-row blocks"


def apple_note() -> Optional[str]:
    """``None`` when apple's ``cut_cross_entropy`` can be found; else why its column is left out."""
    import importlib.util

    if importlib.util.find_spec("cut_cross_entropy") is None:
        return (f"apple's cut-cross-entropy is not installed, its torch_compile column is left "
                f"out ({APPLE_INSTALL} adds it)")
    return None


def available(cases: List[str], device: str = "cpu") -> List[str]:
    """``cases`` without apple's when its package is not installed; on CUDA, apple's Triton
    kernels (``impl="cce"``) join its torch_compile path."""
    if device == "cuda" and APPLE in cases and APPLE_TRITON not in cases:
        cases = cases + [APPLE_TRITON]
    if device != "cuda":
        cases = [c for c in cases if c != APPLE_TRITON]
    return [c for c in cases if c not in (APPLE, APPLE_TRITON) or apple_note() is None]


#: The parts of ``--suite`` (``--parts`` picks some): float32 dense and peaked tables, bf16
#: inputs, the LLM-shaped case and the filter bound check.
PARTS = ("dense", "peaked", "bf16", "llm", "bound")
#: Targets the suite reports as met or missed (ours against the best alternative in the same table).
DENSE_TARGET = 0.95  # time <= 0.95x the best alternative, and the least extra memory
PEAKED_TARGET = 1.5  # >= 1.5x faster than the best alternative
#: Cases that materialise the N x V logits (about three N x V float32 tensors at the peak).
MATERIALISED = ("F.cross_entropy(E @ C.T)", "F.linear_cross_entropy default")


def suite_tables(d: int = 512, smoke: bool = False, parts: Optional[List[str]] = None,
                 vocab: Optional[List[int]] = None) -> List[Dict[str, Any]]:
    """The ``--suite`` tables: part, kind, dtype, N, D, V, cases and a per-case timeout (seconds).

    ``parts`` keeps only those of :data:`PARTS` (default all), ``vocab`` only the dense / peaked
    tables of those V (the other parts are kept). ``smoke`` shrinks every shape
    (N <= 256, D <= 64, V / 64) and keeps the cases, so that every code path of the suite runs in
    a minute or two.
    """
    tables: List[Dict[str, Any]] = []
    for kind, ours in (("dense", ["lossbench ext"]),
                       ("peaked", ["lossbench ext", "lossbench ext unsorted"])):
        for v in (32768, 131072, 262144):
            tables.append(dict(part=kind, kind=kind, dtype="float32", n=8192, d=d, v=v,
                               cases=ours + ALTERNATIVES + [FLOOR], timeout=600))
    for v in (8192, 32768, 131072):
        tables.append(dict(part="bf16", kind="dense", dtype="bfloat16", n=8192, d=d, v=v,
                           cases=["lossbench ext"], timeout=300))
    tables.append(dict(part="llm", kind="peaked", dtype="float32", **LLM_SHAPE,
                       cases=OURS + ALTERNATIVES + [FLOOR], timeout=1800,
                       title="LLM-shaped (Gemma-2-like head)"))
    if parts is not None:
        unknown = sorted(set(parts) - set(PARTS))
        if unknown:
            raise ValueError(f"parts must be among {PARTS}, got {unknown}")
        tables = [t for t in tables if t["part"] in parts]
    if vocab:
        tables = [t for t in tables if t["part"] not in ("dense", "peaked") or t["v"] in vocab]
    if smoke:
        for t in tables:
            t.update(n=min(t["n"], 256), d=min(t["d"], 64), v=max(256, t["v"] // 64),
                     timeout=min(t["timeout"], 600))
    return tables


def mem_available() -> float:
    """Bytes the kernel reports as available (``MemAvailable``), or ``inf`` where unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    return float("inf")


def memory_need(case: str, n: int, d: int, v: int, dtype: str = "float32") -> float:
    """Rough peak bytes of ``case``: the inputs and their gradients, plus three N x V float32
    tensors (logits, log-softmax, their gradient) for the cases that materialise the logits."""
    size = 2 if dtype in ("bfloat16", "float16") else 4
    need = 2.0 * (n + v) * d * size
    if case in MATERIALISED:
        need += 3.0 * n * v * 4
    return need


def too_big(case: str, n: int, d: int, v: int, dtype: str, available: float) -> Optional[str]:
    """Why ``case`` is not run at this shape (it would not fit in memory), or ``None``."""
    need = memory_need(case, n, d, v, dtype)
    if need > 0.9 * available:
        return (f"not run: needs ~{need / 2 ** 30:.0f} GiB, {available / 2 ** 30:.0f} GiB "
                f"available")
    return None


def round_orders(cases: List[str], rounds: int) -> List[List[str]]:
    """Alternating rounds: the case order forwards, then backwards, and so on, so that a drift
    of the machine's state (heat, other load) does not favour the cases that run first."""
    return [list(cases) if r % 2 == 0 else list(reversed(cases)) for r in range(rounds)]


def combine_rounds(case: str, results: List[dict]) -> dict:
    """One row from a case's rounds: median time and extra memory over the rounds that ran,
    every round's time, the largest load average seen; a skip when no round ran."""
    ran = [r for r in results if "time" in r]
    if not ran:
        return results[0] if results else {"case": case, "skipped": "not run"}
    row = dict(ran[0])
    row.update(time=statistics.median(r["time"] for r in ran),
               rounds=[r["time"] for r in ran],
               extra_mib=statistics.median(r["extra_mib"] for r in ran),
               gemm_rate=statistics.median(r["gemm_rate"] for r in ran),
               load=max(r["load"] for r in ran))
    return row


def targets_met(kind: str, ours: dict, best: dict, lean: dict) -> List[bool]:
    """Peaked: [>= PEAKED_TARGET x faster than ``best``]; dense: [time <= DENSE_TARGET x
    ``best``'s, less extra memory than ``lean``] (the fastest and the leanest alternative)."""
    ratio = ours["time"] / best["time"]
    if kind == "peaked":
        return [1.0 / ratio >= PEAKED_TARGET]
    return [ratio <= DENSE_TARGET, ours["extra_mib"] < lean["extra_mib"]]


def target_lines(kind: str, rows: List[dict]) -> List[str]:
    """The issue's targets for this table, met or missed, from its rows."""
    by = {r["case"]: r for r in rows if "time" in r}
    alts = [r for c, r in by.items() if c in ALTERNATIVES]
    ours = by.get("lossbench ext")
    if ours is None or not alts:
        return ["targets: not measured (lossbench ext or every alternative missing)"]
    best = min(alts, key=lambda r: r["time"])
    lean = min(alts, key=lambda r: r["extra_mib"])
    met = targets_met(kind, ours, best, lean)
    ratio = ours["time"] / best["time"]
    if kind == "peaked":
        speedup = 1.0 / ratio
        lines = [f"target: >= {PEAKED_TARGET}x faster than the best alternative ({best['case']}): "
                 f"{'met' if met[0] else 'missed'} ({speedup:.2f}x)"]
        skipped, floor = ours.get("skipped", float("nan")), by.get(FLOOR)
        if skipped == skipped and floor is not None:
            # The logits GEMM is always needed; the two gradient GEMMs only over the kept tiles.
            share = (1.0 + 2.0 * (1.0 - skipped)) / 3.0
            lines.append(f"filtering bound: with {100 * skipped:.0f}% of the tiles skipped the GEMMs "
                         f"are {100 * share:.0f}% of the floor's, {share * floor['time']:.3g} s: at "
                         f"most {best['time'] / (share * floor['time']):.2f}x faster than the best "
                         f"alternative with nothing else in the pass")
        return lines
    return [f"target: time <= {DENSE_TARGET}x the best alternative ({best['case']}): "
            f"{'met' if met[0] else 'missed'} ({ratio:.2f}x)",
            f"target: least extra memory of all: "
            f"{'met' if met[1] else 'missed'} "
            f"({ours['extra_mib']:.0f} MiB vs {lean['extra_mib']:.0f} for {lean['case']})"]


def summary(done: List[tuple]) -> None:
    """One line per suite table: ours against the best and the leanest alternative, in time and
    in memory beyond the gradients, and the float32 targets met or missed (the README's table)."""
    print("summary (ours = lossbench ext; memory beyond the gradients):")
    print("| table | ours (s) | best alternative (s) | ours vs best | ours beyond grads MiB | "
          "least alternative beyond grads MiB | targets |")
    print("|---|---|---|---|---|---|---|")
    for t, rows in done:
        name = f"{t['kind']} {t['dtype']}, N={t['n']}, D={t['d']}, V={t['v']}"
        by = {r["case"]: r for r in rows if "time" in r}
        ours = by.get("lossbench ext")
        alts = [r for c, r in by.items() if c in ALTERNATIVES]
        if ours is None:
            print(f"| {name} | not measured | | | | | |")
            continue
        beyond = ours["extra_mib"] - ours["grads_mib"]
        if not alts:
            print(f"| {name} | {ours['time']:.3g} | - | - | {beyond:.0f} | - | - |")
            continue
        best = min(alts, key=lambda r: r["time"])
        lean = min(alts, key=lambda r: r["extra_mib"])
        ratio = ours["time"] / best["time"]
        met = targets_met(t["kind"], ours, best, lean)
        word = {True: "met", False: "missed"}
        marks = (f">= {PEAKED_TARGET}x faster: {word[met[0]]}" if t["kind"] == "peaked" else
                 f"time: {word[met[0]]}; least memory: {word[met[1]]}")
        print(f"| {name} | {ours['time']:.3g} | {best['time']:.3g} ({best['case']}) | "
              f"{ratio:.2f}x | {beyond:.0f} | "
              f"{lean['extra_mib'] - lean['grads_mib']:.0f} ({lean['case']}) | "
              f"{marks if t['dtype'] == 'float32' else '-'} |")
    print(flush=True)


def block_lines(n: int, v: int, rows: List[dict]) -> List[str]:
    """Low-precision CPU tables: ours beyond the gradients and one float32 logits block, the part
    of its memory that must not grow with V (the block itself follows :func:`block_rows`)."""
    import torch
    from lossbench.cce.dispatch import block_rows

    ours = next((r for r in rows if r["case"] == "lossbench ext" and "time" in r), None)
    if ours is None:
        return []
    r = block_rows(n, v, torch.device("cpu"))
    block = r * v * 4 / 2 ** 20
    return [f"memory: {ours['extra_mib'] - ours['grads_mib']:.0f} MiB beyond the gradients, of "
            f"which one float32 logits block of {r} x {v} is {block:.0f} MiB; "
            f"{ours['extra_mib'] - ours['grads_mib'] - block:.0f} MiB beyond both"]


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
    if name in (APPLE, APPLE_TRITON):
        from cut_cross_entropy import linear_cross_entropy as apple  # worker reports failures

        impl = name.split()[-1]
        return lambda E, C, t: apple(E, C, t, impl=impl)
    if name == FLOOR:
        return bare_gemms
    if name.startswith("lossbench"):
        from lossbench.cce import linear_cross_entropy

        impl = name.split()[1]
        sort = None if "unsorted" not in name else False
        # "lossbench ext rows=512": a fixed row block instead of the default (design experiments)
        rows = next((int(w[5:]) for w in name.split() if w.startswith("rows=")), None)
        return lambda E, C, t, stats=None: linear_cross_entropy(E, C, t, impl=impl, sort_vocab=sort,
                                                                stats=stats, rows_per_block=rows)
    raise ValueError(f"unknown case {name!r}")


def bare_gemms(E, C, t):
    """:data:`FLOOR`: forward returns 0; backward runs the three GEMMs per 512-row block
    (L = E C^T, dE = L C, dC += L^T E) with nothing in between."""
    import torch

    class BareGemms(torch.autograd.Function):
        @staticmethod
        def forward(ctx, E, C):
            ctx.save_for_backward(E, C)
            return E.new_zeros(())

        @staticmethod
        def backward(ctx, g):
            E, C = ctx.saved_tensors
            dE, dC = torch.empty_like(E), torch.zeros_like(C)
            L = E.new_empty(min(512, E.shape[0]), C.shape[0])
            for r0 in range(0, E.shape[0], 512):
                Eb = E[r0:r0 + 512]
                Lb = L[:Eb.shape[0]]
                torch.mm(Eb, C.t(), out=Lb)
                torch.mm(Lb, C, out=dE[r0:r0 + 512])
                dC.addmm_(Lb.t(), Eb)
            return dE, dC

    return BareGemms.apply(E, C)


def make_inputs(kind: str, n: int, d: int, v: int, seed: int = 0):
    """(E, C, targets) in float32 for ``kind`` 'dense' or 'peaked' (see the module doc)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    if kind == "dense":
        E = torch.randn(n, d, generator=gen)
        C = torch.randn(v, d, generator=gen) / d ** 0.5
        t = torch.randint(0, v, (n,), generator=gen)
        return E, C, t
    rank = torch.randperm(v, generator=gen)
    freq = (rank.double() + 1) ** -1.1
    t = torch.multinomial(freq / freq.sum(), n, replacement=True, generator=gen)
    u = torch.randn(d, generator=gen)
    u /= u.norm()
    R = torch.randn(v, d, generator=gen) / d ** 0.5
    R -= (R @ u)[:, None] * u
    C = 3.0 * torch.log(freq / freq.max()).float()[:, None] * u[None, :] + 3.0 * R
    E = (1.0 + 0.1 * torch.randn(n, 1, generator=gen)) * u + 1.5 * R[t]
    E += 0.1 * torch.randn(n, d, generator=gen)
    return E, C, t


def worker(args) -> None:
    import torch

    device = torch.device(args.device)
    try:
        fn = make_case(args.case)
    except ImportError as exc:
        print(json.dumps({"case": args.case, "skipped": f"import failed: {exc}"[:160]}))
        return
    if fn is None:
        print(json.dumps({"case": args.case, "skipped": "not available"}))
        return
    if args.case.startswith("lossbench ext"):
        from lossbench.cce import api

        if api.resolve_impl("ext", device) != "ext":
            print(json.dumps({"case": args.case, "skipped": "extension unavailable"}))
            return
    dtype = getattr(torch, args.dtype)
    E0, C0, t = make_inputs(args.kind, args.n, args.d, args.v)
    E = E0.to(device=device, dtype=dtype).requires_grad_()
    C = C0.to(device=device, dtype=dtype).requires_grad_()
    t = t.to(device)
    del E0, C0
    stats: dict = {}
    ours = args.case.startswith("lossbench")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    bufs = gemm_buffers(args.device, args.n, args.d)

    def step():
        E.grad = C.grad = None
        sync()
        t0 = time.perf_counter()
        (fn(E, C, t, stats) if ours else fn(E, C, t)).backward()
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
    grads_mib = (args.n + args.v) * args.d * E.element_size() / 2 ** 20
    skipped = (stats["tiles_skipped"] / stats["tiles_total"]
               if stats.get("tiles_total") else float("nan"))
    print(json.dumps({"case": args.case, "time": statistics.median(times), "times": times,
                      "extra_mib": extra, "gemm_rate": statistics.median(rates),
                      "grads_mib": grads_mib, "skipped": skipped,
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


def run_case(case: str, n: int, d: int, v: int, device: str, reps: int, timeout: float,
             kind: str = "dense", dtype: str = "float32") -> dict:
    cmd = [sys.executable, __file__, "--worker", case, "--n", str(n), "--d", str(d),
           "--vocab", str(v), "--device", device, "--reps", str(reps), "--kind", kind,
           "--dtype", dtype]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"case": case, "skipped": f"timed out after {timeout:.0f} s"}
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    err = (out.stderr.strip().splitlines() or ["no output"])[-1]
    return {"case": case, "skipped": f"failed: {err[:120]}"}


def machine() -> Dict[str, Any]:
    """What a table's figures depend on besides the code: CPU model, CPU count, memory, torch."""
    import torch

    model = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")),
                         model)
    except OSError:
        pass
    total = 0.0
    try:
        with open("/proc/meminfo") as fh:
            total = next((int(ln.split()[1]) / 2 ** 20 for ln in fh if ln.startswith("MemTotal:")),
                         0.0)
    except OSError:
        pass
    return {"cpu": model, "cpus": os.cpu_count(), "mem_gib": round(total), "torch": torch.__version__}


def table_file(folder: str, spec: Dict[str, Any]) -> str:
    """The file of one suite table under ``--out``: part, dtype and shape in the name."""
    return os.path.join(folder, f"{spec['part']}-{spec['dtype']}-n{spec['n']}-d{spec['d']}"
                                f"-v{spec['v']}.json")


def load_table(path: str, spec: Dict[str, Any], here: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The stored state of a table, or ``None`` (with the reason printed) when there is none to
    resume: no file, an unreadable one, another table's (spec) or another machine's."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as fh:
            state = json.load(fh)
        ok = isinstance(state, dict) and isinstance(state.get("results"), dict)
    except (OSError, ValueError):
        ok = False
    if not ok:
        print(f"note: {path} is unreadable; the table starts anew", flush=True)
        return None
    if state.get("spec") != spec:
        print(f"note: {path} holds a table of other settings; it starts anew", flush=True)
        return None
    if state.get("machine") != here:
        print(f"note: {path} was measured on {state.get('machine')}; this machine is {here}: "
              f"the table starts anew (no table mixes machines)", flush=True)
        return None
    return state


def save_table(path: str, state: Dict[str, Any]) -> None:
    from lossbench.framework.io import atomic_write_text

    atomic_write_text(path, json.dumps(state, indent=1) + "\n")


def table(n: int, d: int, v: int, device: str, reps: int, timeout: float, kind: str,
          dtype: str, cases: list, rate: float, title: str = "", rounds: int = 1,
          targets: bool = False, store: Optional[str] = None, part: str = "") -> List[dict]:
    """Run ``cases`` in ``rounds`` alternating rounds (each case in a fresh process per round)
    and print one row per case: medians over the rounds, every round's time, the load.

    With ``store`` (a JSON file) every finished case-round is written there atomically, and a
    later call with the same settings on the same machine resumes where it stopped (a finished
    table is printed without running anything); the table keeps the GEMM rate measured when it
    started and prints the dates between which it ran."""
    spec = {"part": part, "kind": kind, "dtype": dtype, "n": n, "d": d, "v": v, "device": device,
            "reps": reps, "rounds": rounds, "cases": list(cases)}
    here = machine()
    state = load_table(store, spec, here) if store else None
    if state is None:
        state = {"spec": spec, "machine": here, "rate": rate, "results": {c: [] for c in cases},
                 "dates": []}
    rate = state["rate"]
    bound = 3 * 2 * n * v * d / rate
    if title:
        print(title)
    avail = mem_available() if device == "cpu" else float("inf")
    skip = {c: too_big(c, n, d, v, dtype, avail) for c in cases}
    runnable = [c for c in cases if skip[c] is None]
    results: Dict[str, List[dict]] = state["results"]
    for r, order in enumerate(round_orders(runnable, rounds)):
        for c in order:
            if len(results[c]) > r:
                continue  # measured before a resume
            results[c].append(run_case(c, n, d, v, device, reps, timeout, kind, dtype))
            state["dates"].append(time.strftime("%Y-%m-%d %H:%M"))
            if store:
                save_table(store, state)
    rows = [combine_rounds(c, results[c]) if skip[c] is None else {"case": c, "skipped": skip[c]}
            for c in cases]
    alt = [r["time"] for r in rows if r["case"] in ALTERNATIVES and "time" in r]
    alt_mem = [r["extra_mib"] for r in rows if r["case"] in ALTERNATIVES and "time" in r]
    best = min(alt) if alt else float("nan")
    alts = (f"best alternative {best:.2f} s, least alternative extra memory {min(alt_mem):.0f} MiB"
            if alt else "no alternative in this table")
    print(f"{kind}, {dtype}, N={n}, D={d}, V={v}: 3-GEMM bound {bound:.2f} s; {alts}; median of "
          f"{rounds} alternating round(s)"
          + (f"; run {state['dates'][0]} to {state['dates'][-1]}" if state["dates"] else ""))
    print("| impl | time (s) | rounds (s) | extra peak MiB | beyond grads MiB | vs best alt "
          "| of 3-GEMM bound (run's own rate) | tiles skipped | load avg (max) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "time" not in r:
            print(f"| {r['case']} | {r['skipped']} | | | | | | | |")
            continue
        own = 3 * 2 * n * v * d / r["gemm_rate"]
        sk = r.get("skipped", float("nan"))
        each = ", ".join(f"{t:.3g}" for t in r.get("rounds", [r["time"]]))
        vs = f"{r['time'] / best:.2f}x" if best == best else "-"  # no alternative in the table
        print(f"| {r['case']} | {r['time']:.3g} | {each} | {r['extra_mib']:.0f} | "
              f"{r['extra_mib'] - r['grads_mib']:.0f} | {vs} | "
              f"{100 * bound / r['time']:.0f}% ({100 * own / r['time']:.0f}%) | "
              f"{'' if sk != sk else f'{100 * sk:.0f}%'} | {r['load']:.1f} |")
    if targets and dtype == "float32":
        for line in target_lines(kind, rows):
            print(line)
    if targets and dtype != "float32" and device == "cpu":
        for line in block_lines(n, v, rows):
            print(line)
    print(flush=True)
    return rows


def bound_check(n: int, d: int, v: int, rows: Optional[int] = None) -> None:
    """Peaked case, float32: filtered vs unfiltered gradient against the documented bound."""
    import torch

    from lossbench.cce import linear_cross_entropy

    E0, C0, t = make_inputs("peaked", n, d, v)
    res = {}
    for name, eps in (("exact", None), ("auto", "auto")):
        E, C = E0.clone().requires_grad_(), C0.clone().requires_grad_()
        st: dict = {}
        linear_cross_entropy(E, C, t, filter_eps=eps, stats=st, rows_per_block=rows).backward()
        res[name] = (E.grad, C.grad, st)
    eps = torch.finfo(torch.float32).eps / 32
    Ed, Cd = E0.double(), C0.double()
    bound_e = torch.zeros(n, dtype=torch.float64)
    bound_c = torch.zeros(v, dtype=torch.float64)
    cn, en = Cd.norm(dim=1), Ed.norm(dim=1)
    mass = []
    for r0 in range(0, n, 256):
        p = torch.softmax(Ed[r0:r0 + 256] @ Cd.t(), dim=1)
        mass.append(p.topk(10, dim=1).values.sum(1))
        small = (p < eps).double()
        bound_e[r0:r0 + 256] = eps / n * (small @ cn)
        bound_c += eps * (small.t() @ (en[r0:r0 + 256] / n))
    err_e = (res["auto"][0].double() - res["exact"][0].double()).norm(dim=1)
    err_c = (res["auto"][1].double() - res["exact"][1].double()).norm(dim=1)
    st = res["auto"][2]
    print(f"peaked, float32, N={n}, D={d}, V={v}, rows_per_block={rows}: softmax mass of the top 10 classes: median "
          f"{float(torch.cat(mass).median()):.3f}; tiles skipped "
          f"{100 * st['tiles_skipped'] / st['tiles_total']:.0f}%; "
          f"|dE change| max {float(err_e.max()):.2e} vs bound {float(bound_e.max()):.2e}, "
          f"rows over their bound: {int((err_e > bound_e * (1 + 1e-6) + 1e-9).sum())}; "
          f"|dC change| max {float(err_c.max()):.2e}, rows over: "
          f"{int((err_c > bound_c * (1 + 1e-6) + 1e-9).sum())} "
          "(float32 round-off ~1e-9 allowed)\n", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=None, help="rows N (default 8192; quick 2048)")
    parser.add_argument("--d", type=int, default=512, help="feature width D")
    parser.add_argument("--vocab", type=int, nargs="*", default=None,
                        help="class counts V (default 32768 131072; quick 32768); with --suite: "
                             "only the dense / peaked tables of these V")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--kind", default="dense", choices=["dense", "peaked"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--reps", type=int, default=None, help="timed runs after a warm-up")
    parser.add_argument("--quick", action="store_true", help="small, one timed run")
    parser.add_argument("--suite", action="store_true",
                        help="the tables of docs/cce.md (about 15 min on a quiet 2-core CPU, plus "
                             "30-45 min for the LLM-shaped case)")
    parser.add_argument("--parts", nargs="*", default=None, choices=PARTS,
                        help="with --suite: only these parts (default all)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="alternating rounds per case, median reported (default: 3 with "
                             "--suite, else 1)")
    parser.add_argument("--smoke", action="store_true",
                        help="with --suite: the same cases on tiny shapes (checks that they run)")
    parser.add_argument("--cases", nargs="*", default=None, help="subset of case names")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per case")
    parser.add_argument("--out", default=None,
                        help="with --suite: a folder that keeps every finished case-round (one JSON "
                             "file per table, written atomically); run again to resume or reprint")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.case, args.v = args.worker, args.vocab[0]
        worker(args)
        return

    # Build the extension once up front so that no case times a compilation.
    subprocess.run([sys.executable, "-m", "lossbench.cce.build"], cwd=ROOT, check=False,
                   capture_output=True)
    n = args.n or (2048 if args.quick else 8192)
    rate = gemm_rate(gemm_buffers(args.device, n, args.d))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    reps = args.reps or 1
    rounds = args.rounds or (3 if args.suite and not args.smoke else 1)
    if rounds < 1 or reps < 1:
        parser.error("--rounds and --reps must be >= 1")
    if args.out and not args.suite:
        parser.error("--out keeps the tables of --suite; add --suite")
    print(f"device {args.device}, D={args.d}, fwd+bwd, each case in a fresh process per round: "
          f"a warm-up, then the median of {reps} timed step(s); median over {rounds} alternating "
          f"round(s); float32 GEMM rate {rate / 1e9:.0f} GFLOP/s; load average {load:.1f}; "
          f"{os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M')}\n", flush=True)
    note = apple_note()
    if note:
        print(f"note: {note}\n", flush=True)
    if args.suite:
        # The shapes (N = 8192, D = 512, V in {32768, 131072, 262144}), bf16 and the
        # LLM-shaped case; the targets under each float32 table, ours beyond one logits block
        # under each bf16 one, and a summary line per table at the end.
        done = []
        for t in suite_tables(args.d, smoke=args.smoke, parts=args.parts, vocab=args.vocab):
            rows = table(t["n"], t["d"], t["v"], args.device, reps,
                         min(args.timeout, t["timeout"]), t["kind"], t["dtype"],
                         available(t["cases"], args.device), rate, t.get("title", ""),
                         rounds=rounds, targets=True,
                         store=table_file(args.out, t) if args.out else None, part=t["part"])
            done.append((t, rows))
        summary(done)
        if args.parts is None or "bound" in args.parts:
            if args.smoke:
                bound_check(256, 32, 2048, rows=64)
            else:
                bound_check(1024, args.d, 32768)
                bound_check(1024, args.d, 32768, rows=64)
        print(f"load average at the end {os.getloadavg()[0]:.1f}", flush=True)
        return
    vocab = args.vocab or ([32768] if args.quick else [32768, 131072])
    cases = args.cases or available(OURS + ALTERNATIVES + [FLOOR], args.device)
    for v in vocab:
        table(n, args.d, v, args.device, reps, args.timeout, args.kind, args.dtype, cases, rate,
              rounds=rounds)


if __name__ == "__main__":
    main()
