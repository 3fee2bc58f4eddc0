#!/usr/bin/env python
"""Our CIFAR-10 track next to OpenOOD v1.5's CIFAR-10 / ResNet-18 results: near / far AUROC per score
and which scores rank above MSP in each, then the same per OOD set wherever OpenOOD reports a set of ours.

    python bench/openood_compare.py runs/bench_cifar10_cpu [--loss ce]

OpenOOD's near / far numbers (:data:`OPENOOD_CIFAR10`): OpenOOD's leaderboard file ``results/cifar10.csv``
(branch ``leaderboard`` of zjysteven/OpenOOD, the same figures at commits 28d3a40 and 3d013d4; the rows with
Training = ``CrossEntropy``, Arch = ResNet18, 100 epochs), AUROC in %, mean over 3 ResNet-18 checkpoints
trained with cross-entropy except where the row is listed ±0.00 (fDBD, WeiPer+KLD, NCI: apparently one
checkpoint; fDBD and NCI report ID accuracy 95.22 instead of the 3-checkpoint 95.06); near = CIFAR-100 +
Tiny-ImageNet, far = MNIST, SVHN, Textures, Places365. The recent scores and the method each maps to:
``nac`` = NAC, ``weiper`` = WeiPer+KLD, ``adascale_a`` = AdaSCALE-A and ``adascale_l`` = AdaSCALE-L (the
CrossEntropy rows, 83.92 / 88.00 and 74.99 / 79.02; the ASCOOD-trained rows are another training),
``nci`` = NCI, ``iodin`` = i-ODIN, ``rankfeat`` = RankFeat. Left out: ``vra`` (no leaderboard row),
``mds_norm`` / ``rmds_norm`` (Mahalanobis++ / RMDS++: no CIFAR-10 row; their CIFAR figures use other
checkpoints), ``gram`` (the leaderboard's ``Gram`` row, 58.66 / 71.73, predates OpenOOD's 2024 rewrite of
GRAM, which ``gram`` here follows, so it measures another algorithm).

Ours: ``leaderboard.csv`` of a benchmark run with ``ood_sets: {near: ..., far: ...}``
(here near = Tiny-ImageNet only, far = MNIST, Textures, notMNIST), so the comparison is one of
direction, not of numbers. Losses other than cross-entropy are compared with OpenOOD's CE column.
The agreement count compares, for every score of :data:`OPENOOD_CIFAR10` but MSP whose near and far
AUROCs both ran, its side of MSP (above / below) with OpenOOD's, near and far: 2 per score, so at most
2 x 24 = 48 comparisons (34 before the 7 recent scores were added; a run without them still counts
out of 34, as they show as skipped).

Per-set comparison (:data:`PER_SET_SETS`): OpenOOD ``tin`` = our ``tinyimagenet_test``, ``mnist`` = our
``mnist``, ``texture`` (DTD) = our ``dtd-subset``, which is a 10-class subset of DTD, so that row
compares different image sets. OpenOOD publishes per-set AUROCs only in a spreadsheet outside
its repositories; :data:`OPENOOD_PER_SET` holds the figures found in public repositories and issue
threads, each with its source in :data:`PER_SET_SOURCES`:

- SCALE: tin, mnist, texture (mean over the 3 checkpoints; its near / far means equal the leaderboard's).
- GEN: tin, mnist (mean over the 3 checkpoints; near mean equals the leaderboard's). No texture figure found.
- fDBD: tin, mnist, texture, from checkpoint ``s0`` only, as is the leaderboard's fDBD entry (±0.00);
  that run's near mean equals the leaderboard's (90.42), its far mean (93.00) does not (93.16).

No published per-set figure was found for MSP, ODIN, EBO, MDS, RMDS, GradNorm, ReAct, MLS, KLM, ViM,
KNN, DICE, ASH, SHE or Relation (Relation's per-set CSVs exist only as attachments to OpenOOD pull
request 207; KNN's only as a single-checkpoint run in fDBD's demo notebook, not the 3-checkpoint mean
of the leaderboard); per-set figures of the 7 recent scores were not searched for. Without an OpenOOD
per-set MSP figure OpenOOD's side of MSP per set is unknown, so the per-set agreement count stays empty
(0 of 0) until one is added to :data:`OPENOOD_PER_SET`.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from typing import Dict, List, Optional, Tuple

#: score name here -> (OpenOOD method, near AUROC, far AUROC): OpenOOD's leaderboard ``results/cifar10.csv``
#: (see the module docstring for the file, the rows and the scores left out).
OPENOOD_CIFAR10 = {
    "msp": ("MSP", 88.03, 90.73), "odin": ("ODIN", 82.87, 87.96), "energy": ("EBO", 87.58, 91.21),
    "mds": ("MDS", 84.20, 89.72), "rmds": ("RMDS", 89.80, 92.20), "gradnorm": ("GradNorm", 54.90, 57.55),
    "react": ("ReAct", 87.11, 90.42), "maxlogit": ("MLS", 87.52, 91.10), "kl_matching": ("KLM", 79.19, 82.68),
    "vim": ("ViM", 88.68, 93.48), "knn": ("KNN", 90.64, 92.96), "dice": ("DICE", 78.34, 84.23),
    "ash_b": ("ASH", 75.27, 78.49), "she": ("SHE", 81.54, 85.32), "gen": ("GEN", 88.20, 91.35),
    "scale": ("SCALE", 82.55, 86.39), "relation": ("Relation", 89.77, 92.21), "fdbd": ("fDBD", 90.42, 93.16),
    "nac": ("NAC", 90.93, 94.60), "weiper": ("WeiPer+KLD", 90.54, 93.12),
    "adascale_a": ("AdaSCALE-A", 83.92, 88.00), "adascale_l": ("AdaSCALE-L", 74.99, 79.02),
    "nci": ("NCI", 88.86, 91.27), "iodin": ("i-ODIN", 87.92, 90.99), "rankfeat": ("RankFeat", 79.46, 75.87),
}

#: OpenOOD set -> (our set in leaderboard.csv column names, heading).
PER_SET_SETS: Dict[str, Tuple[str, str]] = {
    "tin": ("tinyimagenet_test", "Tiny-ImageNet (OpenOOD `tin`, ours `tinyimagenet_test`)"),
    "mnist": ("mnist", "MNIST (OpenOOD `mnist`, ours `mnist`)"),
    "texture": ("dtd-subset", "Textures (OpenOOD `texture`: DTD; ours `dtd-subset`: a 10-class DTD subset, "
                              "so the images differ)"),
}

#: score name here -> {OpenOOD set: AUROC in %}, CIFAR-10 / ResNet-18 trained with cross-entropy.
#: Only figures found in the sources of :data:`PER_SET_SOURCES`; a set without a figure is absent.
OPENOOD_PER_SET: Dict[str, Dict[str, float]] = {
    "scale": {"tin": 83.84, "mnist": 90.58, "texture": 83.94},
    "gen": {"tin": 89.20, "mnist": 93.83},
    "fdbd": {"tin": 91.48, "mnist": 94.59, "texture": 92.83},
}

#: score name here -> where its :data:`OPENOOD_PER_SET` figures were read.
PER_SET_SOURCES: Dict[str, str] = {
    "scale": "kai422/SCALE@a4d1115153bd0ac2f3ee1a71ec0f2abbe1a35f5a:"
             "results/cifar10_resnet18_32x32_base_e100_lr0.1_default/ood/scale.csv (OpenOOD's evaluation "
             "CSV, mean ± std over the 3 checkpoints; nearood 82.55 / farood 86.39 as on the leaderboard)",
    "gen": "https://github.com/Jingkang50/OpenOOD/issues/172 (GEN's author, table '## CIFAR10', mean ± std "
           "over the 3 checkpoints; nearood 88.20 as on the leaderboard; its texture row could not be "
           "read, so it is left out)",
    "fdbd": "litianliu/fDBD-OOD@961621e320bfeb9d7456356945fdcafb8a12868b:fDBD_demo_on_openood.ipynb, "
            "output of the fDBD eval_ood cell, index 17 (OpenOOD's Evaluator on checkpoint s0 only; "
            "nearood 90.42 as on the leaderboard, farood 93.00 against the leaderboard's 93.16)",
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


def set_value(row: dict, score: str, our_set: str) -> Optional[float]:
    """Our AUROC of ``score`` on ``our_set`` in % (column ``{score}_{our_set}_auroc_mean``); None when absent."""
    v = row.get(f"{score}_{our_set}_auroc_mean", "")
    return 100 * float(v) if v not in ("", None) else None


def side(v: Optional[float], ref: Optional[float]) -> str:
    """``'above'`` / ``'below'`` MSP's ``ref``, ``''`` when either is unknown."""
    return "" if v is None or ref is None else ("above" if v > ref else "below")


def per_set_rows(row: dict, openood_set: str) -> Tuple[List[dict], int, int]:
    """The per-set comparison on one OpenOOD set: one dict per score with a figure in :data:`OPENOOD_PER_SET`
    (keys ``score``, ``openood``, ``ours``, ``gap``, ``side_openood``, ``side_ours``, ``agree``), and the
    number of agreeing sides of MSP and of comparable ones (both OpenOOD's and our side known)."""
    our_set = PER_SET_SETS[openood_set][0]
    oo_msp = OPENOOD_PER_SET.get("msp", {}).get(openood_set)
    ours_msp = set_value(row, "msp", our_set)
    rows, agree, total = [], 0, 0
    for score, sets in OPENOOD_PER_SET.items():
        if openood_set not in sets:
            continue
        oo, ours = sets[openood_set], set_value(row, score, our_set)
        r = {"score": score, "openood": oo, "ours": ours, "gap": None if ours is None else ours - oo,
             "side_openood": "", "side_ours": "", "agree": None}
        if score != "msp":
            r["side_openood"], r["side_ours"] = side(oo, oo_msp), side(ours, ours_msp)
            if r["side_openood"] and r["side_ours"]:
                r["agree"] = r["side_openood"] == r["side_ours"]
                total += 1
                agree += r["agree"]
        rows.append(r)
    return rows, agree, total


def print_per_set(row: dict, loss: str) -> None:
    """Per OpenOOD set of :data:`PER_SET_SETS`: score | OpenOOD AUROC | ours | gap | sides of MSP | agree."""
    print("\nPer OOD set (AUROC in %; the sources of OpenOOD's figures follow the tables):")
    agree_all = total_all = 0
    for openood_set, (_, heading) in PER_SET_SETS.items():
        rows, agree, total = per_set_rows(row, openood_set)
        agree_all, total_all = agree_all + agree, total_all + total
        print(f"\n{heading}\n")
        print(f"| score | OpenOOD AUROC | ours AUROC ({loss}) | gap (ours - OpenOOD) | "
              "vs MSP: OpenOOD / ours | agree |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            name = OPENOOD_CIFAR10[r["score"]][0] if r["score"] in OPENOOD_CIFAR10 else r["score"]
            ours = "skipped" if r["ours"] is None else f"{r['ours']:.2f}"
            gap = "-" if r["gap"] is None else f"{r['gap']:+.2f}"
            if r["score"] == "msp":
                sides, same = "(reference)", ""
            else:
                sides = (f"{r['side_openood'] or 'n/a (no OpenOOD MSP figure)'} / "
                         f"{r['side_ours'] or ('skipped' if r['ours'] is None else 'n/a')}")
                same = "-" if r["agree"] is None else ("yes" if r["agree"] else "no")
            print(f"| {r['score']} ({name}) | {r['openood']:.2f} | {ours} | {gap} | {sides} | {same} |")
        if not rows:
            print("| (no OpenOOD figure for this set) | | | | | |")
        if "msp" not in OPENOOD_PER_SET or openood_set not in OPENOOD_PER_SET["msp"]:
            ours_msp = set_value(row, "msp", PER_SET_SETS[openood_set][0])
            print(f"\nOur MSP here: {'skipped' if ours_msp is None else f'{ours_msp:.2f}'}; "
                  "OpenOOD's per-set MSP figure: not found.")
    print(f"\nPer-set sides of MSP that agree with OpenOOD's: {agree_all} of {total_all} (sets and scores "
          "where OpenOOD's and our side are both known; OpenOOD's needs its per-set MSP figure).")
    print("\nSources of OpenOOD's per-set figures:")
    for score in OPENOOD_PER_SET:
        print(f"- {score}: {PER_SET_SOURCES.get(score, 'not recorded')}")


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
    print_per_set(row, a.loss)
    return 0


if __name__ == "__main__":
    sys.exit(main())
