"""Accuracy of one training recipe over seeds: train each seed, then test accuracy with and without TTA.

    python bench/seeds.py -c configs/cifar10_fast.yaml --seeds 0 1 2 --output <folder> [train.py flags]

Each seed is an ordinary ``train.py`` run (``<output>/<name>-s<seed>``), so a killed bench resumes
where it stopped: a finished run is not trained again (its training time comes from its ``log.csv``).
After training, the run's ``best.pt`` (with ``keep: last``, the last epoch) is evaluated on the test
split with the config's ``tta`` level (airbench's figure) and without it. The table gives, per seed,
the training time (sum of the epochs' seconds in ``log.csv``, evaluation excluded), the run's wall
time (data loading, training, ``train.py``'s own evaluation and this test evaluation; only this
invocation's part for a run resumed after a kill; ``-`` for a run that had finished before this
invocation), the load average when the seed ended, the test accuracy
and the accuracy with TTA; then mean, sample standard deviation, min and max; the device and the
load average are printed with it.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def train_seed(argv: Sequence[str], seed: int, output: str) -> str:
    """Train (or resume / skip, if finished) one seed; the run folder."""
    from lossbench.framework import Trainer, parse_args

    args = parse_args(list(argv) + ["--seed", str(seed), "--output", output])
    args.name = f"{args.name or 'run'}-s{seed}"
    run_dir = os.path.join(output, args.name)
    if os.path.isfile(os.path.join(run_dir, "last.pt")):
        args.resume = True  # finished runs return at once; a killed one continues
    Trainer(args).fit()
    return run_dir


def is_finished(argv: Sequence[str], seed: int, output: str) -> bool:
    """Whether the seed's run had finished before this invocation (its wall time is then not measured)."""
    from lossbench.framework import parse_args

    args = parse_args(list(argv) + ["--seed", str(seed), "--output", output])
    log = os.path.join(output, f"{args.name or 'run'}-s{seed}", "log.csv")
    if not os.path.isfile(log):
        return False
    with open(log, newline="") as fh:
        done = sum(1 for _ in csv.DictReader(fh))
    return done >= math.ceil(float(args.epochs))


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def train_seconds(run_dir: str) -> float:
    with open(os.path.join(run_dir, "log.csv"), newline="") as fh:
        return sum(float(row["seconds"]) for row in csv.DictReader(fh))


def test_accuracy(run_dir: str, device: str) -> Dict[str, float]:
    """Test accuracy of the run's ``best.pt`` without TTA and with its config's level."""
    from lossbench.framework.builders import load_run, make_loader, predict

    model, args, bundle, _ = load_run(os.path.join(run_dir, "best.pt"), device)
    dev = next(model.parameters()).device
    loader = make_loader(bundle.test, 500)
    out = {}
    for level in sorted({0, int(getattr(args, "tta", 0) or 0)}):
        logits, labels = predict(model, loader, dev, tta=level)
        out[f"tta{level}"] = float((logits.argmax(1) == labels).double().mean())
    out["tta_level"] = int(getattr(args, "tta", 0) or 0)
    return out


def summary(values: List[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return (f"{100 * statistics.mean(values):.2f} ± {100 * sd:.2f} "
            f"(min {100 * min(values):.2f}, max {100 * max(values):.2f})")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", required=True, help="parent folder of the runs (outside the checkout)")
    parser.add_argument("--json", default=None, help="also write the per-seed figures here")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="start no further seed after this many seconds (the table covers the finished ones)")
    args, train_argv = parser.parse_known_args(argv)
    if "--seed" in train_argv or "--output" in train_argv:
        parser.error("pass seeds with --seeds and the folder with --output (train.py's --seed is set per run)")
    import torch

    rows = []
    begin = time.perf_counter()
    for seed in args.seeds:
        if args.max_seconds is not None and rows and time.perf_counter() - begin > args.max_seconds:
            print(f"--max-seconds {args.max_seconds:g} reached: seeds from {seed} on not run", flush=True)
            break
        finished_before = is_finished(train_argv, seed, args.output)
        t0 = time.perf_counter()
        run_dir = train_seed(train_argv, seed, args.output)
        acc = test_accuracy(run_dir, "auto")
        wall = None if finished_before else time.perf_counter() - t0
        row = dict(seed=seed, run=run_dir, train_s=train_seconds(run_dir), wall_s=wall,
                   load_end=os.getloadavg()[0] if hasattr(os, "getloadavg") else None, **acc)
        rows.append(row)
        print(json.dumps(row), flush=True)
    level = rows[0]["tta_level"] if rows else 0
    dev = f"cuda ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else "cpu"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n{len(rows)} seeds on {dev}, torch {torch.__version__}, load average {load:.1f}")
    print(f"| seed | train s | wall s | load | test acc | test acc, TTA {level} |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['train_s']:.1f} | {_fmt(r['wall_s'], '.0f')} | {_fmt(r['load_end'], '.1f')} "
              f"| {100 * r['tta0']:.2f} | {100 * r.get(f'tta{level}', r['tta0']):.2f} |")
    walls = [r["wall_s"] for r in rows if r["wall_s"] is not None]
    print(f"| mean ± sd | {statistics.mean(r['train_s'] for r in rows):.1f} "
          f"| {_fmt(statistics.mean(walls) if walls else None, '.0f')} | "
          f"| {summary([r['tta0'] for r in rows])} | {summary([r.get(f'tta{level}', r['tta0']) for r in rows])} |")
    if args.json:
        tmp = f"{args.json}.tmp"
        with open(tmp, "w") as fh:
            json.dump(rows, fh, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
