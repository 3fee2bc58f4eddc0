#!/usr/bin/env python
"""The loss x OOD-score benchmark: ``python bench.py -c configs/bench_digits.yaml [--losses ce,wcdas --seeds 0,1 ...]``."""

from __future__ import annotations

import sys

from lossbench.framework.cli import run_main


def main(argv=None) -> int:
    from lossbench.experiments.benchmark import main as bench_main

    return bench_main(argv)


if __name__ == "__main__":
    sys.exit(run_main("bench.py", main))
