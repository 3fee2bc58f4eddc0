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

from .checkpoint import CheckpointError, load_checkpoint
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
    return AugmentSpec(mode, args.crop_padding, args.auto_augment, args.reprob)


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


def build_optimizer(args: argparse.Namespace, model: nn.Module) -> torch.optim.Optimizer:
    """timm's optimiser ``args.opt`` at ``args.lr`` / ``args.weight_decay``, with the head's declared settings.

    A head that declares :meth:`~lossbench.losses.base.Head.optim_settings` (e.g. WCDAS's scale)
    gets its own parameter groups (timm's schedulers scale each group's own initial lr); otherwise the
    optimiser is timm's default grouping of the whole model.
    """
    from timm.optim import create_optimizer_v2

    kwargs = {"momentum": args.momentum, "nesterov": args.nesterov} if args.opt == "sgd" else {}
    groups = optimizer_param_groups(model, args.lr, args.weight_decay)
    if groups is None:
        return create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, **kwargs)
    return create_optimizer_v2(groups, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, **kwargs)


def build_scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """timm's cosine schedule with linear warm-up, stepped per optimisation step."""
    from timm.scheduler import CosineLRScheduler

    total = max(1, args.epochs * steps_per_epoch)
    warmup = int(round(args.warmup_epochs * steps_per_epoch))
    return CosineLRScheduler(optimizer, t_initial=total, lr_min=args.min_lr, warmup_t=min(warmup, total - 1),
                             warmup_lr_init=args.lr * 0.01, t_in_epochs=False, warmup_prefix=False)


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of every sample of ``loader`` (model in eval mode)."""
    was_training = model.training
    model.eval()
    outs, labels = [], []
    for x, y in loader:
        outs.append(model(x.to(device)).float().cpu())
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


def load_run(checkpoint: str, device: str = "auto") -> Tuple[Classifier, argparse.Namespace, DataBundle, Dict[str, Any]]:
    """Rebuild the model, configuration and data of a saved run from its checkpoint file."""
    dev = select_device(device)  # a device that is not there: said before anything is loaded
    state = load_checkpoint(checkpoint)
    args = from_dict(state["config"])
    args.pretrained, args.pretrained_file = False, None  # weights come from the checkpoint
    bundle = load_bundle(args)
    model = build_model(args, bundle)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {checkpoint!r} does not fit the model its config describes: {err}") from None
    model.to(dev).eval()
    return model, args, bundle, state
