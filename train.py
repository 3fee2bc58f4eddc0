#!/usr/bin/env python
"""Train a timm backbone with a lossbench loss: ``python train.py -c configs/ce.yaml [--flag value ...]``."""

from __future__ import annotations

import sys

from lossbench.framework.cli import run_main


def main(argv=None) -> int:
    from lossbench.framework import Trainer, parse_args

    summary = Trainer(parse_args(argv)).fit()
    if summary["is_main"]:
        print(f"run folder: {summary['run_dir']}  (epoch {summary['epoch']}, "
              f"best val acc {summary['best_val_acc']:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(run_main("train.py", main))
