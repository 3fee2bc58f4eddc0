#!/usr/bin/env python
"""Head-only check of WCDAS's optimiser recipe: its scale s and test ECE after training on fixed features.

Fixed features (6 Gaussian clusters, D = 32, 1,200 training and 1,200 test points; a noisy problem
where the Bayes accuracy is below 100 %), a head trained alone with batches of 64 for ``--steps``
steps, no schedule, and the 15-bin ECE of the test logits. Recipes: cross-entropy on ``nn.Linear``
(AdamW 2e-3, weight decay 0.05) for reference; WCDAS under AdamW 2e-3 with every parameter at that
lr (the benchmark's recipe before the head declared its own); WCDAS with its declared settings
(``head.param_groups``: s' at peak lr 1.0, no decay on s' and g); WCDAS under the official SGD
(lr 0.2, momentum 0.9); WCDAS with the official fixed s = 250.

    python bench/wcdas_recipe.py [--steps 150 2000] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lossbench.losses import WCDASHead  # noqa: E402
from ood.calibration import accuracy, expected_calibration_error  # noqa: E402

C, D, N = 6, 32, 1200


def features() -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(C, D, generator=g) * 0.5
    y = torch.arange(2 * N) % C
    x = mu[y] + torch.randn(2 * N, D, generator=g)
    return x[:N], y[:N], x[N:], y[N:]


def train(head: nn.Module, opt_fn: Callable, steps: int, data) -> Tuple[float, float, float]:
    xtr, ytr, xte, yte = data
    opt = opt_fn(head)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        i = torch.randint(0, N, (64,), generator=gen)
        loss = head(xtr[i], ytr[i]) if isinstance(head, WCDASHead) else F.cross_entropy(head(xtr[i]), ytr[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        z = head.logits(xte) if isinstance(head, WCDASHead) else head(xte)
        s = float(head.scale) if isinstance(head, WCDASHead) else float("nan")
    return s, expected_calibration_error(z, yte), accuracy(z, yte)


def recipes():
    adamw = lambda h: torch.optim.AdamW([  # noqa: E731 - the benchmark's old grouping (timm: no decay on 1-D)
        {"params": [p for p in h.parameters() if p.ndim > 1], "weight_decay": 0.05},
        {"params": [p for p in h.parameters() if p.ndim <= 1], "weight_decay": 0.0}], lr=2e-3)
    return [
        ("ce (nn.Linear), AdamW 2e-3", lambda: nn.Linear(D, C), adamw),
        ("wcdas, AdamW 2e-3 for every parameter", lambda: WCDASHead(D, C, scale_lr=None), adamw),
        ("wcdas, AdamW 2e-3 + declared settings (s' lr 1.0)", lambda: WCDASHead(D, C),
         lambda h: torch.optim.AdamW(h.param_groups(2e-3, 0.05), lr=2e-3)),
        ("wcdas, SGD 0.2 momentum 0.9 (official)", lambda: WCDASHead(D, C, scale_lr=None),
         lambda h: torch.optim.SGD(h.param_groups(0.2, 5e-4), lr=0.2, momentum=0.9)),
        ("wcdas, fixed s = 250, AdamW 2e-3", lambda: WCDASHead(D, C, s_trainable=False, s=250.0), adamw),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, nargs="+", default=[150, 2000])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = features()
    print("| recipe | steps | s | test ECE (%) | test acc (%) |\n|---|---|---|---|---|")
    for steps in args.steps:
        for name, make, opt_fn in recipes():
            torch.manual_seed(1)
            s, ece, acc = train(make(), opt_fn, steps, data)
            print(f"| {name} | {steps} | {'-' if s != s else f'{s:.1f}'} | {100 * ece:.1f} | {100 * acc:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
