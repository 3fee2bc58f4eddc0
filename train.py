#!/usr/bin/env python
"""Train a timm backbone with a lossbench loss: ``python train.py -c configs/ce.yaml [--flag value ...]``."""

from __future__ import annotations

import sys

from lossbench.config import ConfigError, parse_args
from lossbench.engine import Trainer


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except ConfigError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    summary = Trainer(args).fit()
    if summary["is_main"]:
        print(f"run folder: {summary['run_dir']}  (epoch {summary['epoch']}, "
              f"best val acc {summary['best_val_acc']:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
