"""Mahalanobis fit/score throughput (batched vs a per-class loop), and the wall time of eval.py.

    python bench/ood.py                         # 50,000 x 512 features, 100 classes
    python bench/ood.py --checkpoint RUN/best.pt [-- extra eval.py arguments]

Both implementations compute the same float64 quantities (the table shows their largest
difference): fit = class means + tied covariance + pseudo-inverse; score = min over classes of
the squared Mahalanobis distance. The loop baseline is the form peers use (one pass per class);
it scores only ``--baseline-samples`` samples, since its cost per sample does not depend on N.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ood.scores.mahalanobis import fit_class_gaussian, mahalanobis_distances  # noqa: E402


def loop_fit(f: torch.Tensor, y: torch.Tensor, c: int):
    """Per-class loop: means and scatter class by class, then a pseudo-inverse (float64)."""
    f = f.double()
    d = f.shape[1]
    means = torch.zeros(c, d, dtype=torch.float64)
    scatter = torch.zeros(d, d, dtype=torch.float64)
    for k in range(c):
        fk = f[y == k]
        means[k] = fk.mean(0)
        z = fk - means[k]
        scatter += z.T @ z
    return means, torch.linalg.pinv(scatter / f.shape[0], hermitian=True)


def loop_score(f: torch.Tensor, means: torch.Tensor, prec: torch.Tensor) -> torch.Tensor:
    """Per-class loop: one (N, D) x (D, D) product per class."""
    f = f.double()
    best = torch.full((f.shape[0],), float("inf"), dtype=torch.float64)
    for k in range(means.shape[0]):
        z = f - means[k]
        best = torch.minimum(best, ((z @ prec) * z).sum(1))
    return -best


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--baseline-samples", type=int, default=2_000)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--checkpoint", default=None, help="checkpoint to time eval.py on")
    p.add_argument("eval_args", nargs=argparse.REMAINDER, help="extra eval.py arguments after --")
    a = p.parse_args()

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, a.classes, (a.n,), generator=g)
    centres = torch.randn(a.classes, a.dim, generator=g) * 2
    f = (centres[y] + torch.randn(a.n, a.dim, generator=g)).float()
    nb = min(a.baseline_samples, a.n)

    t_fit, (mu, prec, _) = timed(lambda: fit_class_gaussian(f, y, a.classes, "empirical"), a.repeats)
    t_fit_loop, (mu_l, prec_l) = timed(lambda: loop_fit(f, y, a.classes), a.repeats)
    t_sc, s = timed(lambda: -mahalanobis_distances(f, mu, prec).amin(1), a.repeats)
    t_sc_loop, s_loop = timed(lambda: loop_score(f[:nb], mu_l, prec_l), a.repeats)
    diff = float((s[:nb] - s_loop).abs().max() / s_loop.abs().max())

    print(f"Mahalanobis, {a.n:,} x {a.dim} float32 features, {a.classes} classes, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads (median of {a.repeats})")
    print("| step | batched (ours) | per-class loop | ratio |")
    print("|---|---|---|---|")
    print(f"| fit ({a.n:,} samples) | {t_fit:.2f} s, {a.n / t_fit:,.0f} samples/s | "
          f"{t_fit_loop:.2f} s, {a.n / t_fit_loop:,.0f} samples/s | {t_fit_loop / t_fit:.1f}x |")
    print(f"| score (ours {a.n:,}, loop {nb:,} samples) | {t_sc:.2f} s, {a.n / t_sc:,.0f} samples/s | "
          f"{t_sc_loop:.2f} s, {nb / t_sc_loop:,.0f} samples/s | {(t_sc_loop / nb) / (t_sc / a.n):.1f}x |")
    print(f"max relative score difference (first {nb:,} samples): {diff:.1e}")

    if a.checkpoint:
        extra = [x for x in a.eval_args if x != "--"]
        cmd = [sys.executable, str(ROOT / "eval.py"), "--checkpoint", a.checkpoint, *extra]
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=ROOT, env=os.environ.copy()).returncode
        dt = time.perf_counter() - t0
        print(f"\n| command | wall time | exit code |\n|---|---|---|\n| {' '.join(cmd[1:])} | {dt:.1f} s | {rc} |")


if __name__ == "__main__":
    main()
