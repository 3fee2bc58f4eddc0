"""Builders from a run's configuration: data loaders, model, optimiser, schedule; prediction and reloading.

These are what the trainer, the evaluation of a run and the benchmark share, so a run is rebuilt
the same way wherever it is loaded.
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from ood.calibration import expected_calibration_error

from ..losses.base import Head

from .checkpoint import WEIGHTS_KEYS, CheckpointError, load_checkpoint
from .config import from_dict
from .augment import AugmentSpec, resolve_augment_mode
from .data import DataBundle, get_data, native_channels
from .models import Classifier, create_model
from .runtime import select_device


def make_loader(ds: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0,
                workers: int = 0, drop_last: bool = False) -> DataLoader:
    g = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=workers,
                      drop_last=drop_last and len(ds) > batch_size)


def augment_spec(args: argparse.Namespace) -> AugmentSpec:
    """The training augmentation a (validated) configuration asks for."""
    mode = resolve_augment_mode(args.augment, native_channels(args.data, args.channels))
    return AugmentSpec(mode, args.crop_padding, args.auto_augment, args.reprob, flip_mode=args.flip_mode,
                       pad_mode=args.crop_pad_mode)


def load_bundle(args: argparse.Namespace) -> DataBundle:
    return get_data(args.data, root=args.data_root, img_size=args.img_size, channels=args.channels,
                    seed=args.seed, id_classes=args.id_classes, val_fraction=args.val_fraction,
                    download=args.download, max_train_samples=args.max_train_samples,
                    augment=augment_spec(args), test_folder=args.test_folder, decode_once=args.decode_once,
                    cache_dir=args.cache_dir)


def build_model(args: argparse.Namespace, bundle: DataBundle) -> Classifier:
    return create_model(args.model, bundle.num_classes, args.loss, args.loss_args,
                        in_chans=bundle.spec.channels, pretrained=args.pretrained,
                        pretrained_file=args.pretrained_file, small_stem=args.small_stem,
                        drop_rate=args.drop_rate)


def optimizer_param_groups(model: nn.Module, lr: float, weight_decay: float) -> Optional[List[Dict[str, Any]]]:
    """Parameter groups honouring the head's declared settings, or ``None`` when it declares none.

    The backbone's groups are timm's (``param_groups_weight_decay``: no decay for biases and 1-D
    parameters); the head's are :meth:`lossbench.losses.base.Head.param_groups`.
    """
    from timm.optim import param_groups_weight_decay

    head = getattr(model, "head", None)
    if not isinstance(head, Head) or not head.optim_settings():
        return None
    groups = param_groups_weight_decay(model.backbone, weight_decay) if weight_decay else [
        {"params": [p for p in model.backbone.parameters() if p.requires_grad], "weight_decay": 0.0}]
    head_ids = {id(p) for p in head.parameters()}
    others = [p for n, p in model.named_parameters()
              if p.requires_grad and id(p) not in head_ids and not n.startswith("backbone.")]
    if others:
        raise ValueError("the model has trainable parameters outside backbone and head; cannot group them")
    return [g for g in groups if g["params"]] + head.param_groups(lr, weight_decay)


NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def scaled_param_groups(model: nn.Module, lr: float, weight_decay: float, lr_scale: Dict[str, float],
                        decay_1d: bool = False) -> List[Dict[str, Any]]:
    """Parameter groups with per-parameter learning-rate factors (e.g. airbench's x64 for BatchNorm biases).

    ``lr_scale`` maps a regular expression (``re.search`` on the parameter's name) or the keyword
    ``"norm_bias"`` (biases of normalisation layers) to a factor; the first match wins. A factor
    scales the learning rate, not the weight decay: the group's decay coefficient is divided by it
    so that the decay per step, ``lr * wd``, is unchanged (airbench94's ``bias_scaler``, whose
    group has ``weight_decay = wd / lr_biases``). Decay applies to matrices only unless
    ``decay_1d`` (timm's rule exempts biases and 1-D parameters; airbench decays all). A head's own
    :meth:`~lossbench.losses.base.Head.optim_settings` still apply to its parameters and win.
    """
    import re

    norm_biases = {id(m.bias) for m in model.modules() if isinstance(m, NORM_LAYERS) and getattr(m, "bias", None) is not None}
    head = getattr(model, "head", None)
    head_settings = head.optim_settings() if isinstance(head, Head) else {}
    groups: Dict[tuple, Dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        wd = float(weight_decay) if decay_1d or not (p.ndim <= 1 or name.endswith(".bias")) else 0.0
        scale = 1.0
        for pattern, factor in lr_scale.items():
            hit = id(p) in norm_biases if pattern == "norm_bias" else re.search(pattern, name) is not None
            if hit:
                scale = float(factor)
                break
        wd = wd / scale
        own = head_settings.get(name[len("head."):], {}) if name.startswith("head.") else {}
        if "lr" in own:
            scale = float(own["lr"]) / float(lr)
        elif "lr_scale" in own:
            scale = float(own["lr_scale"])
        if "weight_decay" in own:
            wd = float(own["weight_decay"])
        g = groups.setdefault((scale, wd), {"params": [], "names": [], "lr": lr * scale, "weight_decay": wd})
        g["params"].append(p)
        g["names"].append(name)
    unknown = [k for k in lr_scale if k != "norm_bias" and not any(re.search(k, n) for n, _ in model.named_parameters())]
    if unknown:
        raise ValueError(f"lr_scale patterns {unknown} match no parameter of the model")
    return list(groups.values())


def build_optimizer(args: argparse.Namespace, model: nn.Module) -> torch.optim.Optimizer:
    """timm's optimiser ``args.opt`` at ``args.lr`` / ``args.weight_decay``, with the head's declared settings.

    A head that declares :meth:`~lossbench.losses.base.Head.optim_settings` (e.g. WCDAS's scale)
    gets its own parameter groups (timm's schedulers scale each group's own initial lr); otherwise the
    optimiser is timm's default grouping of the whole model.
    """
    from timm.optim import create_optimizer_v2

    kwargs = {"momentum": args.momentum, "nesterov": args.nesterov} if args.opt == "sgd" else {}
    if getattr(args, "lr_scale", None) or getattr(args, "weight_decay_1d", False):
        groups = scaled_param_groups(model, args.lr, args.weight_decay, args.lr_scale, args.weight_decay_1d)
        return create_optimizer_v2(groups, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, **kwargs)
    groups = optimizer_param_groups(model, args.lr, args.weight_decay)
    if groups is None:
        return create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, **kwargs)
    return create_optimizer_v2(groups, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, **kwargs)


def total_steps(args: argparse.Namespace, steps_per_epoch: int) -> int:
    """Optimisation steps of the run: ``ceil(epochs * steps_per_epoch)`` (epochs may be fractional, as
    airbench's 9.9), capped by ``max_steps``."""
    import math

    total = max(1, math.ceil(args.epochs * steps_per_epoch))
    return min(total, args.max_steps) if args.max_steps is not None else total


def build_scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """The learning-rate schedule, stepped per optimisation step: timm's cosine with linear warm-up from
    ``lr * lr_start_factor`` (``sched: cosine``), or :class:`LinearSchedule` (``sched: linear``)."""
    from timm.scheduler import CosineLRScheduler
    import math

    total = max(1, math.ceil(args.epochs * steps_per_epoch))
    warmup = int(round(args.warmup_epochs * steps_per_epoch))
    if getattr(args, "sched", "cosine") == "linear":
        return LinearSchedule(optimizer, total, min(warmup, total), args.lr_start_factor, args.lr_end_factor)
    return CosineLRScheduler(optimizer, t_initial=total, lr_min=args.min_lr, warmup_t=min(warmup, total - 1),
                             warmup_lr_init=args.lr * args.lr_start_factor, t_in_epochs=False, warmup_prefix=False)


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device, tta: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of every sample of ``loader`` (model in eval mode); ``tta`` > 0: the logits
    averaged over the test-time augmentation views of that level (:mod:`.tta`)."""
    from .tta import tta_logits

    was_training = model.training
    model.eval()
    outs, labels = [], []
    for x, y in loader:
        x = x.to(device)
        outs.append((tta_logits(model, x, tta) if tta else model(x)).float().cpu())
        labels.append(torch.as_tensor(y))
    model.train(was_training)
    if not outs:
        raise ValueError("the loader yielded no samples")
    return torch.cat(outs), torch.cat(labels)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    """Top-1 accuracy, mean cross-entropy and 15-bin ECE of ``logits`` against ``labels``."""
    return {
        "acc": float((logits.argmax(1) == labels).double().mean()),
        "loss": float(torch.nn.functional.cross_entropy(logits.double(), labels)),
        "ece": expected_calibration_error(logits, labels, n_bins=15),
    }


def check_loss_registered(loss: str, plugins: Optional[List[str]], checkpoint: str) -> None:
    """The error for a run whose loss is not registered in this process: the registry's list of names,
    and, when the run was trained with ``--plugin``, the plug-ins to pass again."""
    from ..errors import UnknownNameError
    from ..registry import get_loss_entry

    try:
        get_loss_entry(loss)
    except UnknownNameError as err:
        if plugins:
            raise UnknownNameError(f"checkpoint {checkpoint!r}: {err}; the run was trained with --plugin "
                                   f"{' --plugin '.join(plugins)}: pass the same --plugin") from None
        raise


def load_run(checkpoint: str, device: str = "auto") -> Tuple[Classifier, argparse.Namespace, DataBundle, Dict[str, Any]]:
    """Rebuild the model, configuration and data of a saved run from its checkpoint file (a full
    ``last.pt``, a weights-only ``best.pt`` or an older ``best.pt`` with the training state)."""
    dev = select_device(device)  # a device that is not there: said before anything is loaded
    state = load_checkpoint(checkpoint, required=WEIGHTS_KEYS)
    args = from_dict(state["config"])
    args.pretrained, args.pretrained_file = False, None  # weights come from the checkpoint
    check_loss_registered(args.loss, getattr(args, "plugin", None), checkpoint)  # before the data is loaded
    bundle = load_bundle(args)
    model = build_model(args, bundle)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {checkpoint!r} does not fit the model its config describes: {err}") from None
    model.to(dev).eval()
    return model, args, bundle, state


class LinearSchedule:
    """Piecewise-linear learning rate per step: ``start_factor`` -> 1 over ``warmup_steps``, then 1 ->
    ``end_factor`` at ``total_steps`` (airbench94's ``get_lr``: 0.2 -> 1 over 23 % of the steps, then
    -> 0.07). Each parameter group's peak is its own ``initial_lr``; the same interface as timm's
    schedulers (``step_update``, ``state_dict``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                 start_factor: float = 0.2, end_factor: float = 0.0):
        if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"need 0 <= warmup_steps <= total_steps and total_steps >= 1, "
                             f"got {warmup_steps}, {total_steps}")
        self.optimizer, self.total, self.warmup = optimizer, int(total_steps), int(warmup_steps)
        self.start_factor, self.end_factor = float(start_factor), float(end_factor)
        for g in optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
        self.step_update(0)

    def factor(self, step: int) -> float:
        if step < self.warmup:
            frac = step / self.warmup
            return self.start_factor * (1 - frac) + frac
        frac = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return (1 - frac) + self.end_factor * frac

    def step_update(self, num_updates: int) -> None:
        f = self.factor(int(num_updates))
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * f

    def state_dict(self) -> Dict[str, Any]:
        return {"total": self.total, "warmup": self.warmup}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass  # stateless: the factor follows the step
