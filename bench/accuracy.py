#!/usr/bin/env python
"""Test-split accuracy and 15-bin ECE of saved runs (no OOD scoring), one line per checkpoint.

    python bench/accuracy.py runs/c10sub_none/last.pt runs/c10sub_cifar/last.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lossbench.framework.builders import classification_metrics, load_run, make_loader, predict  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    a = p.parse_args()
    print("| checkpoint | epoch | augment | test images | test acc | test ECE |")
    print("|---|---:|---|---:|---:|---:|")
    for ckpt in a.checkpoints:
        model, args, bundle, state = load_run(ckpt, a.device)
        m = classification_metrics(*predict(model, make_loader(bundle.test, a.batch_size), next(model.parameters()).device))
        print(f"| {ckpt} | {state['epoch']} | {args.augment} | {len(bundle.test)} | {m['acc']:.4f} | {m['ece']:.4f} |",
              flush=True)


if __name__ == "__main__":
    main()
