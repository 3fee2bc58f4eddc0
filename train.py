#!/usr/bin/env python
"""Train a timm backbone with a lossbench loss: ``python train.py -c configs/ce.yaml [--flag value ...]``."""

from __future__ import annotations

import sys

from lossbench.framework.cli import run_main


#: Exit status of a run stopped by Ctrl-C (128 + SIGINT, the shell's convention).
INTERRUPTED = 130


def main(argv=None) -> int:
    import os

    from lossbench.framework import Trainer, parse_args

    args = parse_args(argv)
    try:
        summary = Trainer(args).fit()
    except KeyboardInterrupt:  # Ctrl-C: say where the run stands and how to continue it, no traceback
        last = os.path.join(args.output, args.name, "last.pt") if args.name else None
        if last is not None and os.path.isfile(last):
            where = f"the last finished epoch is in {last}; the same command with --resume continues the run"
        else:
            where = "no epoch had finished, so nothing was saved; the same command starts it again"
        print(f"train.py: interrupted; {where}", file=sys.stderr)
        return INTERRUPTED
    if summary["is_main"]:
        print(f"run folder: {summary['run_dir']}  (epoch {summary['epoch']}, "
              f"best val acc {summary['best_val_acc']:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(run_main("train.py", main))
