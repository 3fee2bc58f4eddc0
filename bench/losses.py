#!/usr/bin/env python
"""Forward+backward time of every registered loss relative to ``nn.Linear`` + ``F.cross_entropy``.

Each loss runs as the trainer uses it: heads directly, logit losses on top of an ``nn.Linear``
(``lossbench.build_head``), on the same float32 CPU features (default N=4096, D=512, C=1000),
with gradients for the parameters and the features. Methods are timed round-robin after a
warm-up, so load on the machine hits them alike; the table reports medians as Markdown.

    python bench/losses.py [--n 4096] [--d 512] [--c 1000] [--reps 7] [--warmup 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import lossbench  # noqa: E402
from lossbench.registry import get_loss_entry

BASELINE = "nn.Linear + F.cross_entropy"


def _step_fn(module: nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        loss_fn(x, y).backward()
        if x.is_cuda:
            torch.cuda.synchronize(x.device)

    return step


def main(argv: List[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--c", type=int, default=1000)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu (the reported table) or cuda")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    x = torch.randn(args.n, args.d, device=device, requires_grad=True)
    y = torch.randint(0, args.c, (args.n,), device=device)

    steps: Dict[str, Callable[[], None]] = {}
    linear = nn.Linear(args.d, args.c).to(device)
    steps[BASELINE] = _step_fn(linear, lambda f, t: F.cross_entropy(linear(f), t), x, y)
    for name in lossbench.list_losses():
        head = lossbench.build_head(name, num_classes=args.c, in_features=args.d).to(device)
        head.train()
        steps[name] = _step_fn(head, head, x, y)

    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times: Dict[str, List[float]] = {k: [] for k in steps}
    for _ in range(args.reps):
        for key, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - t0)

    base = statistics.median(times[BASELINE])
    where = (f"CPU ({torch.get_num_threads()} threads)" if device.type == "cpu"
             else torch.cuda.get_device_name(device))
    print(f"forward+backward, float32, {where}, torch {torch.__version__}, "
          f"N={args.n}, D={args.d}, C={args.c}, median of {args.reps} after {args.warmup} warm-up\n")
    print("| loss | kind | median ms | vs baseline |")
    print("|---|---|---:|---:|")
    for key, ts in times.items():
        kind = "baseline" if key == BASELINE else get_loss_entry(key).kind
        med = statistics.median(ts)
        print(f"| {key} | {kind} | {med * 1e3:.1f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
