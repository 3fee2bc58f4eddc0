#!/usr/bin/env python
"""Our CIFAR-10 track next to OpenOOD v1.5's CIFAR-10 / ResNet-18 leaderboard: near / far AUROC per
score, and which scores rank above MSP in each.

    python bench/openood_compare.py runs/bench_cifar10_cpu [--loss ce]

OpenOOD's numbers: its leaderboard file ``results/cifar10.csv`` (near / far AUROC in %, mean over 3
ResNet-18 checkpoints trained with cross-entropy; near = CIFAR-100 + Tiny-ImageNet, far = MNIST, SVHN,
Textures, Places365). Ours: ``leaderboard.csv`` of a benchmark run with ``ood_sets: {near: ..., far: ...}``
(here near = Tiny-ImageNet only, far = MNIST, Textures, notMNIST), so the comparison is one of
direction, not of numbers. Losses other than cross-entropy are compared with OpenOOD's CE column.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

#: score name here -> (OpenOOD method, near AUROC, far AUROC), OpenOOD v1.5 results/cifar10.csv.
OPENOOD_CIFAR10 = {
    "msp": ("MSP", 88.03, 90.73), "odin": ("ODIN", 82.87, 87.96), "energy": ("EBO", 87.58, 91.21),
    "mds": ("MDS", 84.20, 89.72), "rmds": ("RMDS", 89.80, 92.20), "gradnorm": ("GradNorm", 54.90, 57.55),
    "react": ("ReAct", 87.11, 90.42), "maxlogit": ("MLS", 87.52, 91.10), "kl_matching": ("KLM", 79.19, 82.68),
    "vim": ("ViM", 88.68, 93.48), "knn": ("KNN", 90.64, 92.96), "dice": ("DICE", 78.34, 84.23),
    "ash_b": ("ASH", 75.27, 78.49), "she": ("SHE", 81.54, 85.32), "gen": ("GEN", 88.20, 91.35),
    "scale": ("SCALE", 82.55, 86.39), "relation": ("Relation", 89.77, 92.21), "fdbd": ("fDBD", 90.42, 93.16),
}


def read_row(path: str, loss: str) -> dict:
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["loss"] == loss:
                return row
    raise SystemExit(f"loss {loss!r} not in {path}")


def value(row: dict, score: str, group: str):
    key = f"{score}_group:{group}_auroc_mean"
    v = row.get(key, "")
    return 100 * float(v) if v not in ("", None) else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench_dir", help="a benchmark output folder with leaderboard.csv")
    p.add_argument("--loss", default="ce")
    a = p.parse_args(argv)
    row = read_row(os.path.join(a.bench_dir, "leaderboard.csv"), a.loss)
    ours_msp = (value(row, "msp", "near"), value(row, "msp", "far"))
    oo_msp = OPENOOD_CIFAR10["msp"][1:]

    def mark(v, ref):
        return "" if v is None or ref is None else ("above" if v > ref else "below")

    print(f"| score | OpenOOD near | ours near ({a.loss}) | OpenOOD far | ours far ({a.loss}) | "
          "vs MSP near: OpenOOD / ours | vs MSP far: OpenOOD / ours | agree |")
    print("|---|---|---|---|---|---|---|---|")
    agree = total = 0
    for score, (name, near, far) in OPENOOD_CIFAR10.items():
        on, of = value(row, score, "near"), value(row, score, "far")
        if score == "msp":
            cmp_n = cmp_f = "(reference)"
            same = ""
        else:
            mn, mf = (mark(near, oo_msp[0]), mark(on, ours_msp[0])), (mark(far, oo_msp[1]), mark(of, ours_msp[1]))
            cmp_n, cmp_f = f"{mn[0]} / {mn[1] or 'skipped'}", f"{mf[0]} / {mf[1] or 'skipped'}"
            if on is not None and of is not None:
                total += 2
                agree += (mn[0] == mn[1]) + (mf[0] == mf[1])
                same = f"{(mn[0] == mn[1]) + (mf[0] == mf[1])}/2"
            else:
                same = "-"
        fmt = (lambda v: "skipped" if v is None else f"{v:.1f}")
        print(f"| {score} ({name}) | {near:.2f} | {fmt(on)} | {far:.2f} | {fmt(of)} | {cmp_n} | {cmp_f} | {same} |")
    print(f"\nSides of MSP that agree with OpenOOD's: {agree} of {total} (near and far, scores that ran).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
