"""OOD score timings: every feature score's and every model score's fit and scoring time, KNN vs faiss,
Mahalanobis, eval.py.

    python bench/ood.py                          # scores + knn + model tables: 50,000 x 512 train, 10,000 queries
    python bench/ood.py --part mahalanobis       # batched vs per-class-loop Mahalanobis, 100 classes
    python bench/ood.py --part odin-search       # ODIN / i-ODIN searches: step directions shared vs inline
    python bench/ood.py --part model             # the scores that run the model: resnet10t, 2,000 + 1,000 images
    python bench/ood.py --checkpoint RUN/best.pt [-- extra eval.py arguments]

Scores table: synthetic post-ReLU features (Gaussian class clusters, ``--classes`` classes) and a
least-squares linear head; fit = ``fit_features`` on the training features, score =
``score_features`` on the queries (median of ``--repeats``). KNN table: our exact torch search
against faiss's exact ``IndexFlatL2`` (``pip install faiss-cpu``; skipped when absent) on the
same normalised bank, with the largest score difference.

Model-score table (``--part model``, part of the default run): every score with ``needs == 'model'``
(its own passes through the network: input perturbation, input gradients, hooks on inner layers or
extra forwards: ODIN, i-ODIN, Mahalanobis, AdaSCALE-A/-L, RankFeat, GRAM, NAC; GradNorm is a feature
score here, in closed form on the penultimate features, so it is in the scores table) on a randomly
initialised ``lossbench.framework.models.create_model(--model-arch, 10 classes, 'ce')`` (default
resnet10t at 32 px without the small stem, the CPU CIFAR-10 track's network; ``--model-small-stem``
for the GPU tracks' resnet18) in eval mode, with seeded N(0, 1) images and random labels; fit =
``score.fit(model, train_loader, val_loader=val_loader)`` and score = ``score.score(model,
query_loader)``, the calls :func:`ood.evaluate_ood` makes for such scores (``score.evaluate`` calls
``score`` per loader). ODIN, i-ODIN and Mahalanobis get the CIFAR-10 std as ``input_std``, as the
benchmark gives them the data's std (``PIXEL_STEP_SCORES``); Mahalanobis with a ``val_loader`` runs
its ``validation`` protocol (FGSM samples, eps chosen on them) inside ``fit``. Besides wall seconds the
table gives the process's CPU seconds (all threads), which depend less on other jobs sharing the cores.

ODIN search table (``--part odin-search``): ``evaluate_ood`` with ``search=True`` for ODIN and i-ODIN
on the same random model, ``--model-val`` validation and as many validation-OOD images, in alternating
rounds (``--repeats`` of each): the step directions shared across each temperature's eps values (the
default) against computing them at every grid point (the memo's budget set to 0); the scores must
agree bit for bit.

Mahalanobis table:
Both implementations compute the same float64 quantities (the table shows their largest
difference): fit = class means + tied covariance + pseudo-inverse; score = min over classes of
the squared Mahalanobis distance. The loop baseline is the form peers use (one pass per class);
it scores only ``--baseline-samples`` samples, since its cost per sample does not depend on N.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
# This file is named ood.py: drop its own folder from the path so that ``import ood`` is the library.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

from ood import Classifier, create_score, list_scores  # noqa: E402
from ood.registry import get_score_class  # noqa: E402
from ood.scores.feature_base import ScoreNotApplicable, l2_normalise  # noqa: E402
from ood.scores.mahalanobis import fit_class_gaussian, mahalanobis_distances  # noqa: E402

#: Per-channel std of CIFAR-10 (lossbench.framework.data): the ``input_std`` of the pixel-step scores.
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

#: Settings for the timing run where a default does not fit the synthetic data.
BENCH_KWARGS = {"vim": {"dim": 256}}


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


def synthetic(n: int, q: int, dim: int, classes: int, seed: int = 0):
    """Post-ReLU class-cluster features, labels, a least-squares linear head, and OOD-ish queries."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    h = torch.relu(centres[y] + torch.randn(n, dim, generator=g)).float()
    yq = torch.randint(0, classes, (q,), generator=g)
    hq = torch.relu(centres[yq] * (torch.rand(q, 1, generator=g) < 0.5) + torch.randn(q, dim, generator=g)).float()
    a = torch.cat([h.double(), torch.ones(n, 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(a, 5.0 * torch.nn.functional.one_hot(y, classes).double()).solution
    clf = Classifier.from_linear(sol[:-1].T.contiguous(), sol[-1])
    return h, y, hq, clf


def scores_table(a) -> None:
    h, y, hq, clf = synthetic(a.n, a.queries, a.dim, a.classes)
    z, zq = clf.logits(h).float(), clf.logits(hq).float()
    names = [n for n in list_scores() if get_score_class(n).needs == "features"] + ["gen"]
    print(f"Feature scores, {a.n:,} x {a.dim} training features, {a.queries:,} queries, {a.classes} classes, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads (median of {a.repeats})")
    print("| score | settings | fit (s) | score (s) | queries/s |")
    print("|---|---|---|---|---|")
    for n in names:
        kw = BENCH_KWARGS.get(n, {})
        s = create_score(n, **kw)
        try:
            if n == "gen":
                t_fit, t_sc = 0.0, timed(lambda: s.score_logits(zq), a.repeats)[0]
            else:
                t_fit = timed(lambda: s.fit_features(h, z, y, clf), a.repeats)[0]
                t_sc = timed(lambda: s.score_features(hq, zq), a.repeats)[0]
        except ScoreNotApplicable as err:
            print(f"| {n} | skipped: {err} | | | |", flush=True)
            continue
        settings = ", ".join(f"{k}={v}" for k, v in s.info().items() if k not in ("chunk",)) or "-"
        print(f"| {n} | {settings} | {t_fit:.2f} | {t_sc:.2f} | {a.queries / t_sc:,.0f} |", flush=True)


def knn_table(a) -> None:
    h, y, hq, clf = synthetic(a.n, a.queries, a.dim, a.classes)
    z, zq = clf.logits(h).float(), clf.logits(hq).float()
    knn = create_score("knn", k=a.k)
    t_fit, _ = timed(lambda: knn.fit_features(h, z, None, clf), a.repeats)
    t_sc, ours = timed(lambda: knn.score_features(hq, zq), a.repeats)
    print(f"\nKNN (k={a.k}), exact search, {a.n:,} x {a.dim} bank, {a.queries:,} queries (median of {a.repeats})")
    print("| backend | build (s) | search (s) | queries/s | max abs score difference vs ours |")
    print("|---|---|---|---|---|")
    print(f"| torch (ours) | {t_fit:.2f} | {t_sc:.2f} | {a.queries / t_sc:,.0f} | 0 |")
    try:
        import faiss
    except ImportError:
        print("| faiss IndexFlatL2 | not installed (pip install faiss-cpu) | | | |")
        return
    bank = l2_normalise(h.double()).float().numpy()
    qn = l2_normalise(hq.double()).float().numpy()

    def build():
        index = faiss.IndexFlatL2(a.dim)
        index.add(bank)
        return index

    t_b, index = timed(build, a.repeats)
    t_s, (d, _) = timed(lambda: index.search(qn, a.k), a.repeats)
    theirs = -np.sqrt(np.maximum(d[:, -1], 0))  # faiss returns squared distances
    diff = float(np.abs(theirs - ours.numpy()).max())
    print(f"| faiss {faiss.__version__} IndexFlatL2 | {t_b:.2f} | {t_s:.2f} | {a.queries / t_s:,.0f} | {diff:.1e} |")
    print(f"faiss search / ours: {t_s / t_sc:.2f}x the time (faiss {t_sc / t_s:.2f}x faster)")


def mahalanobis_table(a) -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, a.maha_classes, (a.n,), generator=g)
    centres = torch.randn(a.maha_classes, a.dim, generator=g) * 2
    f = (centres[y] + torch.randn(a.n, a.dim, generator=g)).float()
    nb = min(a.baseline_samples, a.n)

    t_fit, (mu, prec, _) = timed(lambda: fit_class_gaussian(f, y, a.maha_classes, "empirical"), a.repeats)
    t_fit_loop, (mu_l, prec_l) = timed(lambda: loop_fit(f, y, a.maha_classes), a.repeats)
    t_sc, s = timed(lambda: -mahalanobis_distances(f, mu, prec).amin(1), a.repeats)
    t_sc_loop, s_loop = timed(lambda: loop_score(f[:nb], mu_l, prec_l), a.repeats)
    diff = float((s[:nb] - s_loop).abs().max() / s_loop.abs().max())

    print(f"Mahalanobis, {a.n:,} x {a.dim} float32 features, {a.maha_classes} classes, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads (median of {a.repeats})")
    print("| step | batched (ours) | per-class loop | ratio |")
    print("|---|---|---|---|")
    print(f"| fit ({a.n:,} samples) | {t_fit:.2f} s, {a.n / t_fit:,.0f} samples/s | "
          f"{t_fit_loop:.2f} s, {a.n / t_fit_loop:,.0f} samples/s | {t_fit_loop / t_fit:.1f}x |")
    print(f"| score (ours {a.n:,}, loop {nb:,} samples) | {t_sc:.2f} s, {a.n / t_sc:,.0f} samples/s | "
          f"{t_sc_loop:.2f} s, {nb / t_sc_loop:,.0f} samples/s | {(t_sc_loop / nb) / (t_sc / a.n):.1f}x |")
    print(f"max relative score difference (first {nb:,} samples): {diff:.1e}")



def random_model_and_images(a):
    """The model tables' network (random weights, eval mode) and a maker of seeded N(0, 1) image loaders."""
    from torch.utils.data import DataLoader, TensorDataset

    from lossbench.framework.models import create_model

    torch.manual_seed(a.seed)
    model = create_model(a.model_arch, a.classes, "ce", small_stem=a.model_small_stem).eval()
    g = torch.Generator().manual_seed(a.seed)

    def images(n: int) -> DataLoader:
        x = torch.randn(n, 3, a.model_size, a.model_size, generator=g)
        y = torch.randint(0, a.classes, (n,), generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=a.model_batch, shuffle=False)

    return model, images


def model_table(a) -> None:
    """Fit and score time of every ``needs == 'model'`` score through its own ``fit`` / ``score``."""
    from lossbench.experiments.evaluate_run import PIXEL_STEP_SCORES

    model, images = random_model_and_images(a)

    train, val, queries = images(a.model_n), images(a.model_val), images(a.model_queries)
    names = [n for n in list_scores() if get_score_class(n).needs == "model"]
    if a.model_scores:
        names = [n for n in names if n in a.model_scores.split(",")]
    stem = ", small stem" if a.model_small_stem else ""
    print(f"\nModel scores, {a.model_arch}{stem} (random weights, eval mode), {a.classes} classes, "
          f"{a.model_n:,} training + {a.model_val:,} validation images ({a.model_size} px, random), "
          f"{a.model_queries:,} queries, batch {a.model_batch}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads (median of {a.repeats})")
    print("| score | settings | fit (s) | score (s) | queries/s | fit / score CPU (s) |")
    print("|---|---|---|---|---|---|")

    def cpu_timed(fn):
        c0 = time.process_time()
        t = timed(fn, a.repeats)[0]
        return t, (time.process_time() - c0) / a.repeats

    for n in names:
        kw = {"input_std": CIFAR10_STD} if n in PIXEL_STEP_SCORES else {}
        s = create_score(n, **kw)
        try:
            t_fit, c_fit = cpu_timed(lambda: s.fit(model, train, val_loader=val))
            t_sc, c_sc = cpu_timed(lambda: s.score(model, queries))
        except ScoreNotApplicable as err:
            print(f"| {n} | skipped: {err} | | | | |", flush=True)
            continue
        info = {k: v for k, v in s.info().items() if k not in ("chunk", "input_std", "eps_grid")}
        settings = ", ".join(f"{k}={v}" for k, v in info.items()) or "-"
        print(f"| {n} | {settings} | {t_fit:.2f} | {t_sc:.2f} | {a.model_queries / t_sc:,.1f} | "
              f"{c_fit:.2f} / {c_sc:.2f} |", flush=True)


def odin_search_table(a) -> None:
    """``evaluate_ood(..., search=True)`` for ODIN and i-ODIN, step directions shared vs inline."""
    import ood.scores.odin as odin_module
    from ood import evaluate_ood

    model, images = random_model_and_images(a)

    train, val, vood, test, out = (images(n) for n in (256, a.model_val, a.model_val, 256, 256))
    budget = odin_module.DIRECTION_MEMO_BYTES
    print(f"\nODIN + i-ODIN searches (OpenOOD grids, {len(odin_module.ODIN.GRID['temperature'])} x "
          f"{len(odin_module.ODIN.GRID['eps'])} points each), {a.model_arch} (random weights), "
          f"{a.model_val:,} validation + {a.model_val:,} validation-OOD images, alternating rounds; "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| variant | round | wall (s) | CPU (s) |")
    print("|---|---|---|---|")
    times: dict = {"shared": [], "inline": []}
    results = {}
    for r in range(a.repeats):
        for variant in (("inline", "shared") if r % 2 == 0 else ("shared", "inline")):
            odin_module.DIRECTION_MEMO_BYTES = budget if variant == "shared" else 0
            try:
                c0, t0 = time.process_time(), time.perf_counter()
                res = evaluate_ood(model, train, test, {"ood": out}, scores=["odin", "iodin"], val_loader=val,
                                   val_ood_loader=vood, search=True)
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            finally:
                odin_module.DIRECTION_MEMO_BYTES = budget
            times[variant].append(wall)
            results[variant] = res
            print(f"| {variant} | {r + 1} | {wall:.1f} | {cpu:.1f} |", flush=True)
    sh, inl = results["shared"], results["inline"]
    same = sh["search"] == inl["search"] and all(
        np.array_equal(sh["scores"][n][k][part], inl["scores"][n][k][part])
        for n in ("odin", "iodin") for k in sh["scores"][n] for part in ("id", "ood"))
    print(f"median wall: inline {statistics.median(times['inline']):.1f} s, shared "
          f"{statistics.median(times['shared']):.1f} s ({statistics.median(times['inline']) / statistics.median(times['shared']):.2f}x); "
          f"results identical: {same}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("scores", "knn", "model", "mahalanobis", "odin-search", "default", "all"),
                   default="default",
                   help="default: scores + knn + model")
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--maha-classes", type=int, default=100)
    p.add_argument("--baseline-samples", type=int, default=2_000)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--model-arch", default="resnet10t", help="timm name of the model-score table's backbone")
    p.add_argument("--model-small-stem", action="store_true", help="the small-image stem (ResNets)")
    p.add_argument("--model-n", type=int, default=2_000, help="training images of the model-score table")
    p.add_argument("--model-val", type=int, default=500, help="ID validation images (val_loader)")
    p.add_argument("--model-queries", type=int, default=1_000, help="images scored")
    p.add_argument("--model-size", type=int, default=32, help="image side in pixels")
    p.add_argument("--model-batch", type=int, default=128)
    p.add_argument("--model-scores", default="", help="comma-separated subset of the model scores (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default=None, help="checkpoint to time eval.py on")
    p.add_argument("eval_args", nargs=argparse.REMAINDER, help="extra eval.py arguments after --")
    a = p.parse_args()
    if a.part in ("scores", "default", "all"):
        scores_table(a)
    if a.part in ("knn", "default", "all"):
        knn_table(a)
    if a.part in ("model", "default", "all"):
        model_table(a)
    if a.part in ("mahalanobis", "all"):
        mahalanobis_table(a)
    if a.part in ("odin-search", "all"):
        odin_search_table(a)
    if a.checkpoint:
        extra = [x for x in a.eval_args if x != "--"]
        cmd = [sys.executable, str(ROOT / "eval.py"), "--checkpoint", a.checkpoint, *extra]
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=ROOT, env=os.environ.copy()).returncode
        dt = time.perf_counter() - t0
        print(f"\n| command | wall time | exit code |\n|---|---|---|\n| {' '.join(cmd[1:])} | {dt:.1f} s | {rc} |")


if __name__ == "__main__":
    main()
