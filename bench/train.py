#!/usr/bin/env python
"""Training throughput (images/s): lossbench's trainer against a bare hand-written timm loop.

Same model, data, batch size and optimiser, in one run; each variant warms up first (that also
absorbs torch.compile's compilation) and is then timed over ``--steps`` optimisation steps.

    python bench/train.py                       # resnet18 on the digits set, 32x32, batch 64
    python bench/train.py --model resnet10t --steps 20 --variants bare,ours,channels_last
    python bench/train.py --case fast --data imagefolder:../shared/datasets/cifar10-jpeg-subset \
        --batch-size 1024 --steps 8 --warmup 2 --variants bare,ours,bare,ours --repeats 1
    python bench/train.py --case cifar-aug --data imagefolder:../shared/datasets/cifar10-jpeg-subset \
        --model resnet18 --small-stem --batch-size 128 --variants bare,ours

``--case cifar-aug`` is the augmented CIFAR case: random crop (4-px padding) + flip, SGD with
Nesterov momentum; the bare loop is what a user would write with torchvision: a Dataset over the
same decoded uint8 images applying ``v2.RandomCrop`` / ``v2.RandomHorizontalFlip`` / normalisation per
image, a shuffling DataLoader, ``timm.create_model`` with the same stem, ``torch.optim.SGD``; both
are timed with their data loading.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lossbench.framework.config import parse_args  # noqa: E402
from lossbench.framework.runtime import seed_everything  # noqa: E402
from lossbench.framework.trainer import Trainer  # noqa: E402

VARIANTS = ("bare", "ours", "channels_last", "compile", "channels_last+compile", "ours_fp32")


def bare_loop(trainer: Trainer, steps: int, warmup: int, channels_last: bool = False) -> float:
    """The loop a user would write: timm model with its own classifier, AdamW, F.cross_entropy."""
    import timm

    args = trainer.args
    seed_everything(args.seed)
    model = timm.create_model(args.model, num_classes=trainer.bundle.num_classes,
                              in_chans=trainer.bundle.spec.channels)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    model.train()
    loader = trainer._train_loader(0)
    batches = [b for _, b in zip(range(steps + warmup), _forever(loader))]
    n_img, t0 = 0, None
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            t0, n_img = time.perf_counter(), 0
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n_img += y.shape[0]
    return n_img / (time.perf_counter() - t0)


class _BareAugmented(torch.utils.data.Dataset):
    """The hand-written data set of the bare loop: uint8 images -> v2 crop/flip -> float -> normalise."""

    def __init__(self, images, labels, mean, std, padding):
        from torchvision.transforms import v2

        self.images, self.labels = images, labels
        size = images.shape[-1]
        self.tf = v2.Compose([v2.RandomCrop(size, padding=padding), v2.RandomHorizontalFlip(),
                              v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.tf(self.images[i]), self.labels[i]


def bare_augmented_loop(trainer: Trainer, steps: int, warmup: int) -> float:
    """The augmented CIFAR case by hand: torchvision transforms per image, timm model, SGD + Nesterov."""
    import timm

    from lossbench.framework.stems import use_small_stem

    args, b = trainer.args, trainer.bundle
    raw = [b.train_raw[i] for i in range(len(b.train_raw))]
    images = torch.stack([x for x, _ in raw])
    labels = torch.tensor([y for _, y in raw])
    seed_everything(args.seed)
    model = timm.create_model(args.model, num_classes=b.num_classes, in_chans=b.spec.channels)
    if args.small_stem:
        use_small_stem(model)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, nesterov=True,
                          weight_decay=args.weight_decay)
    ds = _BareAugmented(images, labels, b.spec.mean, b.spec.std, args.crop_padding)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, drop_last=True)
    model.train()
    n_img, t0 = 0, None
    for i, (x, y) in enumerate(_forever(loader)):
        if i == warmup:
            t0, n_img = time.perf_counter(), 0
        if i == warmup + steps:
            break
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n_img += y.shape[0]
    return n_img / (time.perf_counter() - t0)


def shift_each(padded: torch.Tensor, r: int) -> torch.Tensor:
    """Crop every image of a batch padded by ``r`` at its own offset in [0, 2r]^2: one masked copy per
    offset, the way a hand-written loop does it for small ``r``."""
    n, c, hp, wp = padded.shape
    h, w = hp - 2 * r, wp - 2 * r
    offsets = torch.randint(0, 2 * r + 1, (n, 2))
    out = torch.empty(n, c, h, w, dtype=padded.dtype)
    for top in range(2 * r + 1):
        for left in range(2 * r + 1):
            pick = (offsets[:, 0] == top) & (offsets[:, 1] == left)
            out[pick] = padded[pick, :, top:top + h, left:left + w]
    return out


def bare_fast_loop(trainer: Trainer, steps: int, warmup: int) -> float:
    """airbench94's loop by hand on the same decoded images: the timm-registered network with its own
    bias-free classifier, whitening from 5,000 images, alternating flips and a 2-px translation drawn per
    image on the reflect-padded batch (airbench94's ``batch_crop`` draws one offset per image too) from one
    in-memory tensor, SGD + Nesterov with the x64 BatchNorm-bias group, label-smoothed cross-entropy, bf16
    autocast where the trainer uses it, channels-last, Lookahead every 5 steps."""
    import timm

    from lossbench.framework.nets.airbench import whitening_filters

    args, b = trainer.args, trainer.bundle
    raw = [b.train_raw[i] for i in range(len(b.train_raw))]
    images = torch.stack([x for x, _ in raw])
    labels = torch.tensor([y for _, y in raw])
    mean = torch.tensor(b.spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(b.spec.std).view(1, -1, 1, 1)
    seed_everything(args.seed)
    model = timm.create_model(args.model, num_classes=b.num_classes).to(memory_format=torch.channels_last)
    with torch.no_grad():
        model.stem.weight.copy_(whitening_filters((images[:5000].float() / 255 - mean) / std))
    norm = [p for n, p in model.named_parameters() if "norm" in n and p.requires_grad]
    other = [p for n, p in model.named_parameters() if "norm" not in n and p.requires_grad]
    wd = args.weight_decay
    opt = torch.optim.SGD([dict(params=norm, lr=args.lr * 64, weight_decay=wd / 64),
                           dict(params=other, lr=args.lr, weight_decay=wd)], momentum=args.momentum, nesterov=True)
    ema = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    base_flip = torch.rand(len(labels)) < 0.5
    amp = trainer.amp_dtype
    model.train()
    n_img, t0, step, epoch = 0, None, 0, 0
    while step < warmup + steps:
        perm = torch.randperm(len(labels))
        for i in range(len(labels) // args.batch_size):
            if step == warmup:
                t0, n_img = time.perf_counter(), 0
            if step == warmup + steps:
                break
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            x = (images[idx].float() / 255 - mean) / std
            flip = base_flip[idx] ^ bool(epoch % 2)
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            x = shift_each(F.pad(x, (2, 2, 2, 2), mode="reflect"), 2).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
                loss = F.cross_entropy(model(x), labels[idx], label_smoothing=0.2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % 5 == 0:
                with torch.no_grad():
                    state = model.state_dict()
                    for k, a in ema.items():
                        a.lerp_(state[k], 0.5)
                        state[k].copy_(a)
            n_img += len(idx)
        epoch += 1
    return n_img / (time.perf_counter() - t0)


def _gemm_rate(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of an n x n matrix product in ``dtype`` (what the machine gives right now)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def _forever(loader):
    while True:
        yield from loader


def ours(base: list, steps: int, warmup: int, extra: list) -> float:
    """lossbench's Trainer.train_epoch (what train.py runs), without the per-epoch validation."""
    args = parse_args(base + extra)
    trainer = Trainer(args)
    trainer.args.max_steps = warmup
    trainer.train_epoch()
    trainer.args.max_steps = warmup + steps
    start_step = trainer.global_step
    t0 = time.perf_counter()
    done = 0
    while trainer.global_step < warmup + steps:
        trainer.epoch += 1
        trainer.train_epoch()
    done = (trainer.global_step - start_step) * args.batch_size
    return done / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--data", default="digits")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--case", default="plain", choices=["plain", "cifar-aug", "fast"],
                   help="plain: AdamW, no augmentation; cifar-aug: crop + flip, SGD + Nesterov; "
                        "fast: configs/cifar10_fast.yaml (airbench94) against bare_fast_loop")
    p.add_argument("--small-stem", action="store_true")
    a = p.parse_args()
    base = ["--model", a.model, "--data", a.data, "--img-size", str(a.img_size), "--batch-size", str(a.batch_size),
            "--epochs", "1000", "--no-progress", "--loss", "ce", "--output", "build/bench-train"]
    base += ["--small-stem"] if a.small_stem else []
    if a.data.startswith("imagefolder:"):
        base += ["--cache-dir", "build/cache"]  # decode the folder once for all variants
    if a.case == "fast":  # the recipe's own options; --data / --batch-size / --model still apply
        base = ["-c", "configs/cifar10_fast.yaml"] + base
        if a.model == "resnet18":
            a.model = "lossbench_airbench94"
            base[base.index("--model") + 1] = a.model
    if a.case == "cifar-aug":
        base += ["--augment", "cifar", "--opt", "sgd", "--lr", "0.1", "--weight-decay", "5e-4", "--nesterov"]
    elif not a.data.startswith("imagefolder:"):
        base += ["--augment", "none"]
    variants = [v for v in a.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown variants {bad}; expected some of {VARIANTS}")
    ref_trainer = Trainer(parse_args(base))
    all_runs: dict = {}  # a variant named twice (bare,ours,bare,ours) pools its runs: alternating cancels drift
    for v in variants:
        runs = all_runs.setdefault(v, [])
        for _ in range(a.repeats):
            if v == "bare" and a.case == "fast":
                runs.append(bare_fast_loop(ref_trainer, a.steps, a.warmup))
            elif v == "bare" and a.case == "cifar-aug":
                runs.append(bare_augmented_loop(ref_trainer, a.steps, a.warmup))
            elif v == "bare":
                runs.append(bare_loop(ref_trainer, a.steps, a.warmup))
            else:
                extra = []
                if "channels_last" in v:
                    extra.append("--channels-last")
                if "compile" in v:
                    extra.append("--compile")
                if v.endswith("fp32"):
                    extra.append("--no-amp")
                runs.append(ours(base, a.steps, a.warmup, extra))
        print(f"  {v}: runs so far {', '.join(f'{r:.1f}' for r in runs)} img/s", flush=True)
    results = {v: statistics.median(runs) for v, runs in all_runs.items()}
    gemm = {str(dt).replace("torch.", ""): _gemm_rate(dt) for dt in (torch.float32, torch.bfloat16)}
    ref = results.get("bare")
    print(f"\ncase {a.case}, model {a.model}{' (small stem)' if a.small_stem else ''}, data {a.data} "
          f"{a.img_size}x{a.img_size}, batch {a.batch_size}, "
          f"{a.steps} timed steps after {a.warmup} warm-up, median of {len(next(iter(all_runs.values())))} runs per variant, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; 2048^3 GEMM in this process: "
          + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in gemm.items()) + "\n")
    print("| variant | images/s | vs bare loop |")
    print("|---|---:|---:|")
    for v, r in results.items():
        print(f"| {v} | {r:.1f} | {r / ref:.3f} |" if ref else f"| {v} | {r:.1f} | - |")


if __name__ == "__main__":
    main()
