#!/usr/bin/env python
"""Evaluate a trained run: accuracy, ECE and OOD detection; writes metrics.json, results.md, roc.png, hist.png.

    python eval.py --run runs/demo
    python eval.py --checkpoint runs/demo/best.pt --ood heldout,gaussian,uniform --scores msp,energy
    python eval.py --run runs/c10 --ood-group near=imagefolder:../shared/datasets/tinyimagenet/test \
        --ood-group far=mnist,imagefolder:../shared/datasets/dtd-subset \
        --val-ood imagefolder:../shared/datasets/tinyimagenet/val --search --scores all

The loss x score benchmark has its own script: ``python bench.py -c configs/bench_digits.yaml``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from lossbench.framework.cli import list_type, run_main


def _group(text: str):
    """``NAME=SET,SET`` -> ``(NAME, [SET, SET])``."""
    name, sep, sets = text.partition("=")
    names = [v for v in sets.split(",") if v]
    if not sep or not name or not names:
        raise argparse.ArgumentTypeError(f"expected NAME=SET[,SET...], got {text!r}")
    return name, names


def build_parser() -> argparse.ArgumentParser:
    from lossbench.experiments.evaluate_run import DEFAULT_SCORES
    from ood import CONVENTIONS, list_scores

    p = argparse.ArgumentParser(prog="eval.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run folder; its best.pt is evaluated")
    src.add_argument("--checkpoint", help="checkpoint file")
    sets = p.add_mutually_exclusive_group()
    sets.add_argument("--ood", type=list_type(str, "--ood"), default=None,
                      help="OOD sets: heldout, gaussian, uniform, a data set name or imagefolder:<path> "
                           "(default: heldout if the data has held-out classes, gaussian, uniform)")
    sets.add_argument("--ood-group", type=_group, action="append", default=None, metavar="NAME=SET,SET",
                      help="a named group of OOD sets (repeat: --ood-group near=... --ood-group far=...); "
                           "tables add each group's mean")
    p.add_argument("--val-ood", default=None,
                   help="the validation OOD set (never a test set) for --search")
    p.add_argument("--search", action="store_true",
                   help="choose each score's hyper-parameters from its grid by AUROC of the ID validation split "
                        "vs --val-ood (OpenOOD's protocol; the test sets are not used)")
    p.add_argument("--feature-cache", default=None,
                   help="folder of the cached feature passes (default: <output folder>/features)")
    p.add_argument("--no-feature-cache", action="store_true", help="do not read or write the feature cache")
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
    from lossbench.errors import UserInputError
    from lossbench.experiments import evaluate_checkpoint, write_report
    from lossbench.experiments.evaluate_run import REPORT_FILES, check_score_kwargs, resolve_scores

    args = build_parser().parse_args(argv)
    ckpt = args.checkpoint or os.path.join(args.run, "best.pt")
    if args.run:
        from lossbench.framework.checkpoint import stale_best

        stale = stale_best(args.run)
        if stale:
            raise UserInputError(f"--run {args.run!r}: {stale}; resume the run (train.py with its options and "
                                 f"--resume) to bring best.pt up to date, or pass --checkpoint to evaluate it as it is")
    out = args.out or os.path.dirname(os.path.abspath(ckpt))
    ood_sets = args.ood
    if args.ood_group:
        ood_sets = {}
        for name, names in args.ood_group:
            if name in ood_sets:
                raise UserInputError(f"--ood-group {name!r} is given twice; name each group once")
            ood_sets[name] = names
    if args.search and args.val_ood is None:
        raise UserInputError("--search needs --val-ood, the validation OOD set the search is run on")
    check_score_kwargs(resolve_scores(args.scores), args.score_args, "--score-args")  # before loading anything
    cache = None if args.no_feature_cache else (args.feature_cache or os.path.join(out, "features"))
    result = evaluate_checkpoint(ckpt, ood_sets=ood_sets, scores=args.scores, score_kwargs=args.score_args,
                                 convention=args.convention, data_root=args.data_root,
                                 batch_size=args.batch_size, device=args.device,
                                 max_ood_samples=args.max_ood_samples, progress=not args.no_progress,
                                 val_ood=args.val_ood, search=args.search, feature_cache_dir=cache)
    print(write_report(result, out))
    print(f"wrote {', '.join(REPORT_FILES)} to {out}"
          + (f"; feature cache in {cache}" if cache else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run_main("eval.py", main))
