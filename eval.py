#!/usr/bin/env python
"""Evaluate a trained run: accuracy, ECE and OOD detection; writes metrics.json, results.md, roc.png, hist.png.

    python eval.py --run runs/demo
    python eval.py --checkpoint runs/demo/best.pt --ood heldout,gaussian,uniform --scores msp,energy

The loss x score benchmark has its own script: ``python bench.py -c configs/bench_digits.yaml``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from lossbench.framework.cli import list_type, run_main


def build_parser() -> argparse.ArgumentParser:
    from lossbench.experiments.evaluate_run import DEFAULT_SCORES
    from ood import CONVENTIONS, list_scores

    p = argparse.ArgumentParser(prog="eval.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run folder; its best.pt is evaluated")
    src.add_argument("--checkpoint", help="checkpoint file")
    p.add_argument("--ood", type=list_type(str, "--ood"), default=None,
                   help="OOD sets: heldout, gaussian, uniform, a data set name or imagefolder:<path> "
                        "(default: heldout if the data has held-out classes, gaussian, uniform)")
    p.add_argument("--scores", type=list_type(str, "--scores"), default=None,
                   help=f"OOD scores, or 'all' (default: {','.join(DEFAULT_SCORES)}; all: {','.join(list_scores())})")
    p.add_argument("--score-args", type=json.loads, default=None,
                   help='JSON {score: {arg: value}}, e.g. \'{"energy": {"temperature": 1}}\'')
    p.add_argument("--convention", default="paper", choices=list(CONVENTIONS))
    p.add_argument("--data-root", default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-ood-samples", type=int, default=2000)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="output folder (default: the checkpoint's folder)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p


def main(argv=None) -> int:
    from lossbench.experiments import evaluate_checkpoint, write_report

    args = build_parser().parse_args(argv)
    ckpt = args.checkpoint or os.path.join(args.run, "best.pt")
    result = evaluate_checkpoint(ckpt, ood_sets=args.ood, scores=args.scores, score_kwargs=args.score_args,
                                 convention=args.convention, data_root=args.data_root,
                                 batch_size=args.batch_size, device=args.device,
                                 max_ood_samples=args.max_ood_samples, progress=not args.no_progress)
    out = args.out or os.path.dirname(os.path.abspath(ckpt))
    print(write_report(result, out))
    print(f"wrote metrics.json, results.md, roc.png, hist.png to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main("eval.py", main))
