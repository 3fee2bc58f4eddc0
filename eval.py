#!/usr/bin/env python
"""Evaluate a trained run: accuracy, ECE and OOD detection; writes metrics.json, results.md, roc.png, hist.png.

    python eval.py --run runs/demo
    python eval.py --checkpoint runs/demo/best.pt --ood heldout,gaussian,uniform --scores msp,energy
    python eval.py bench -c configs/bench_digits.yaml [--seeds 0,1 --epochs 2 --losses ce,wcdas ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ood import CONVENTIONS, list_scores
from ood.pipeline import evaluate_checkpoint, write_report


def _names(text: str) -> list:
    return [t for t in text.replace(" ", ",").split(",") if t]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run folder; its best.pt is evaluated")
    src.add_argument("--checkpoint", help="checkpoint file")
    p.add_argument("--ood", type=_names, default=None,
                   help="OOD sets: heldout, gaussian, uniform, a data set name or imagefolder:<path> "
                        "(default: heldout if the data has held-out classes, gaussian, uniform)")
    p.add_argument("--scores", type=_names, default=None, help=f"OOD scores (default: all of {list_scores()})")
    p.add_argument("--score-args", type=json.loads, default=None,
                   help='JSON {score: {arg: value}}, e.g. \'{"energy": {"temperature": 1}}\'')
    p.add_argument("--convention", default="paper", choices=list(CONVENTIONS))
    p.add_argument("--data-root", default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-ood-samples", type=int, default=2000)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="output folder (default: the checkpoint's folder)")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the loss x OOD-score benchmark (ood/benchmark.py)
        from ood.benchmark import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    ckpt = args.checkpoint or os.path.join(args.run, "best.pt")
    result = evaluate_checkpoint(ckpt, ood_sets=args.ood, scores=args.scores, score_kwargs=args.score_args,
                                 convention=args.convention, data_root=args.data_root,
                                 batch_size=args.batch_size, device=args.device,
                                 max_ood_samples=args.max_ood_samples)
    out = args.out or os.path.dirname(os.path.abspath(ckpt))
    print(write_report(result, out))
    print(f"wrote metrics.json, results.md, roc.png, hist.png to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
