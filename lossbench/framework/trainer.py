"""The training loop: :class:`Trainer` runs one training run (``train.py`` is argument parsing plus one call).

Data flows one way: config -> data + timm backbone -> features -> head/loss -> trainer ->
checkpoint. Training is seeded and deterministic on the CPU: the shuffling of epoch ``e`` is drawn
from a generator seeded with ``seed + e`` and the global RNG states are saved in every checkpoint,
so a run resumed from ``last.pt`` ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
import time
from typing import Any, Dict, Iterator, List, Optional

import torch
import torch.nn as nn
import yaml
from torch.utils.data import DataLoader, Dataset

from .averaging import WeightAverager
from .builders import (build_model, build_optimizer, build_scheduler, classification_metrics, load_bundle,
                       make_loader, predict, total_steps)
from .checkpoint import (WEIGHTS_KEYS, CheckpointError, best_epoch_of, check_resumable, load_checkpoint,
                         save_checkpoint, weights_only)
from .config import to_dict
from .ood_sets import get_ood_dataset
from .distributed import GlobalBatchSampler, all_reduce_sum, barrier, init_distributed
from .io import atomic_write_text, remove_stale_temp_files
from .augment import BatchAugment
from .mixup import build_mixup, mix_batch, soft_target_loss
from .models import Classifier
from .runtime import amp_dtype, rng_state, select_device, seed_everything, set_rng_state
LOG_FIELDS = ("epoch", "step", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_ece", "seconds")


class _Indexed(Dataset):
    """``(x, y, i)``: a dataset's samples with their index (for per-sample state such as alternating flips)."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y = self.base[i]
        return x, y, i


def _cycle(loader: DataLoader) -> Iterator:
    while True:
        for batch in loader:
            yield batch


def _checkpoint_epoch(path: str) -> Optional[int]:
    """The ``epoch`` of the checkpoint at ``path``; ``None`` when it is missing or unreadable."""
    if not os.path.exists(path):
        return None
    try:
        return int(load_checkpoint(path, required=WEIGHTS_KEYS)["epoch"])
    except CheckpointError:
        return None


class LossStep(nn.Module):
    """The training computation as one module, so DistributedDataParallel sees every parameter use.

    ``forward(x, y)`` -> (loss, detached logits); with outliers ``x_out`` the outlier term
    ``outlier_loss(logits_in, logits_out)`` is added: the energy-bounded term of Liu et al. 2020
    (:class:`~lossbench.losses.energy_margin.EnergyMarginLoss`) or Outlier Exposure's
    (:class:`~lossbench.losses.outlier_exposure.OutlierExposureLoss`).
    """

    def __init__(self, model: Classifier, outlier_loss: Optional[nn.Module] = None):
        super().__init__()
        self.model = model
        self.outlier_loss = outlier_loss

    @property
    def energy_loss(self) -> Optional[nn.Module]:
        """The outlier term (its former name)."""
        return self.outlier_loss

    def forward(self, x: torch.Tensor, y: torch.Tensor, x_out: Optional[torch.Tensor] = None):
        soft = y.is_floating_point()  # mixup / cutmix probability targets (N, C)
        if (x_out is None or self.outlier_loss is None) and not soft:
            return self.model.loss(x, y)
        with_out = x_out is not None and self.outlier_loss is not None
        f = self.model.features(torch.cat([x, x_out]) if with_out else x)
        f_in = f[: x.shape[0]]
        logits_in = self.model.head.logits(f_in)
        loss = soft_target_loss(self.model.head, logits_in, y) if soft else self.model.head(f_in, y)
        if with_out:
            loss = loss + self.outlier_loss(logits_in.float(), self.model.head.logits(f[x.shape[0]:]).float())
        return loss, logits_in.detach()


def build_outlier_loss(args: argparse.Namespace) -> nn.Module:
    """The outlier term chosen by ``--outlier-loss``: ``energy`` (default) or ``oe``."""
    if args.outlier_loss == "oe":
        from ..losses.outlier_exposure import OutlierExposureLoss

        return OutlierExposureLoss(weight=args.oe_weight)
    from ..losses.energy_margin import EnergyMarginLoss

    return EnergyMarginLoss(m_in=args.m_in, m_out=args.m_out, weight=args.energy_weight)


class Trainer:
    """One training run: folder ``<output>/<name>`` with ``config.yaml``, ``log.csv``, ``last.pt`` (the full
    state, for ``--resume``) and ``best.pt`` (weights, configuration and record; no optimiser state).

    Under ``torchrun`` it trains with DistributedDataParallel (gloo on CPU, NCCL on GPUs): ``--batch-size``
    is the global batch, every rank gets its slice of the same global batches (see
    :mod:`lossbench.framework.distributed`), training metrics are summed over ranks, and only rank 0 evaluates,
    logs and writes checkpoints.
    """

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = select_device(args.device)
        self.dist = init_distributed(self.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        if args.batch_size % self.dist.world_size:
            raise ValueError(f"batch_size {args.batch_size} (the global batch) must be divisible by the "
                             f"number of processes {self.dist.world_size}")
        if args.name is None:
            args.name = f"{args.data.split(':')[0]}-{args.model}-{args.loss}"
        self.run_dir = os.path.join(args.output, args.name)
        seed_everything(args.seed)
        self.bundle = load_bundle(args)
        self.model = build_model(args, self.bundle).to(self.device)
        if args.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.amp_dtype = amp_dtype(args, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.outlier_loss: Optional[nn.Module] = None
        self.outliers: Optional[Iterator] = None
        if args.outlier_data:
            self.outlier_loss = build_outlier_loss(args)
            ods = get_ood_dataset(args.outlier_data, self.bundle, root=args.data_root, seed=args.seed + 1,
                                  n_noise=len(self.bundle.train), download=args.download)
            sampler = GlobalBatchSampler(len(ods), args.batch_size, args.seed + 1, self.dist.rank,
                                         self.dist.world_size)
            self.outliers = _cycle(DataLoader(ods, batch_sampler=sampler, num_workers=args.workers))
        step: nn.Module = LossStep(self.model, self.outlier_loss)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            if args.sync_bn and self.device.type == "cuda":
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
                step = LossStep(self.model, self.outlier_loss)
            step = DDP(step, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.step_fn = torch.compile(step) if args.compile else step
        self.optimizer = build_optimizer(args, self.model)
        self.batch_augment = self._device_augment()
        self.steps_per_epoch = len(self._train_loader(0))
        if self.steps_per_epoch == 0:
            raise ValueError("the training split is empty")
        self.total_steps = total_steps(args, self.steps_per_epoch)
        self.averager: Optional[WeightAverager] = None
        self._averager_state: Optional[Dict[str, Any]] = None
        self.scheduler = build_scheduler(args, self.optimizer, self.steps_per_epoch)
        self.val_loader = make_loader(self.bundle.val, args.batch_size * 2, workers=args.workers)
        self.mixup = build_mixup(args.mixup, args.cutmix, args.mixup_prob, args.mixup_switch_prob,
                                 self.bundle.num_classes)
        self.epoch, self.global_step, self.best_val_acc, self.best_epoch = 0, 0, -1.0, 0
        self.log_rows: List[Dict[str, Any]] = []

    @property
    def energy_loss(self) -> Optional[nn.Module]:
        """The outlier term (its former name, whichever ``--outlier-loss`` chose)."""
        return self.outlier_loss

    def _device_augment(self) -> Optional[BatchAugment]:
        """:class:`BatchAugment` on the device for decoded uint8 data (``--device-augment``; auto: on CUDA)."""
        mode, b = self.args.device_augment, self.bundle
        if b.augment is not None and b.augment.batch_only and (mode != "on" or b.train_raw is None):
            raise ValueError("flip_mode 'alternating' and crop_pad_mode 'reflect' need device_augment 'on' and "
                             "decoded image-folder data (decode_once)")
        if mode == "off" or (mode == "auto" and self.device.type != "cuda"):
            return None
        usable = b.train_raw is not None and (b.augment is None or b.augment.batchable)
        if not usable:
            if mode == "on":
                raise ValueError("device_augment 'on' needs decoded image-folder data (decode_once) and crop/flip "
                                 "augmentation only (no auto_augment, reprob 0)")
            return None
        from .augment import NO_AUGMENT

        return BatchAugment(b.augment or NO_AUGMENT, b.spec.mean, b.spec.std, n_samples=len(b.train_raw),
                            seed=self.args.seed).to(self.device)

    # -- state -------------------------------------------------------------------------------
    def _train_loader(self, epoch: int) -> DataLoader:
        sampler = GlobalBatchSampler(len(self.bundle.train), self.args.batch_size,
                                     seed=self.args.seed * 1000 + epoch, rank=self.dist.rank,
                                     world_size=self.dist.world_size)
        ds = self.bundle.train_raw if getattr(self, "batch_augment", None) is not None else self.bundle.train
        if getattr(self, "batch_augment", None) is not None and self.batch_augment.alternating:
            ds = _Indexed(ds)
        return DataLoader(ds, batch_sampler=sampler, num_workers=self.args.workers)

    def state(self) -> Dict[str, Any]:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "epoch": self.epoch, "global_step": self.global_step,
            "best_val_acc": self.best_val_acc, "best_epoch": self.best_epoch, "config": to_dict(self.args),
            "log": list(self.log_rows),
            "rng": rng_state(), "classes": self.bundle.classes, "num_classes": self.bundle.num_classes,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "averager": self.averager.state_dict() if self.averager is not None else None,
        }

    def resume(self, path: str) -> None:
        state = load_checkpoint(path)
        check_resumable(state["config"], to_dict(self.args), f"checkpoint {path!r}",
                        "resume with the same options or choose another --name")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"checkpoint {path!r} does not fit this model/optimizer: {err}") from None
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])
        self.best_val_acc = float(state.get("best_val_acc", -1.0))
        self.log_rows = list(state.get("log", []))
        self._averager_state = state.get("averager")
        self.best_epoch = best_epoch_of(state)
        set_rng_state(state["rng"])

    def sync_run_files(self) -> List[str]:
        """Bring ``best.pt`` and ``log.csv`` up to what the (resumed) state records; what was done, as lines.

        ``fit`` writes ``last.pt`` first and derives ``best.pt`` and ``log.csv`` from the same state, so
        a run killed between those writes has them one epoch behind. ``log.csv`` is always rewritten from
        the state's log; when the state's own epoch is the best one and ``best.pt`` holds another epoch
        (or is missing or unreadable), ``best.pt`` is rewritten from ``last.pt`` (its weights-only part,
        :func:`~lossbench.framework.checkpoint.weights_only`, as ``fit`` writes it). A ``best.pt`` that
        differs from an older best epoch cannot be restored from ``last.pt``: that is reported, not repaired.
        """
        notes: List[str] = []
        self._write_log()
        path = os.path.join(self.run_dir, "best.pt")
        if self.best_epoch <= 0:
            return notes
        held = _checkpoint_epoch(path)
        if held == self.best_epoch:
            return notes
        was = "was missing" if held is None and not os.path.exists(path) else (
            "was unreadable" if held is None else f"held epoch {held}")
        if self.best_epoch == self.epoch:  # fit saved this very state to both files
            save_checkpoint(path, weights_only(load_checkpoint(os.path.join(self.run_dir, "last.pt"))))
            notes.append(f"best.pt brought up to epoch {self.best_epoch} (it {was})")
        else:
            notes.append(f"warning: best.pt {was}, but the best epoch is {self.best_epoch}; last.pt (epoch "
                         f"{self.epoch}) cannot restore it")
        return notes

    def _write_log(self) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=LOG_FIELDS)
        w.writeheader()
        for row in self.log_rows:
            w.writerow({k: row.get(k) for k in LOG_FIELDS})
        atomic_write_text(os.path.join(self.run_dir, "log.csv"), buf.getvalue())

    # -- loop --------------------------------------------------------------------------------
    def train_epoch(self) -> Dict[str, float]:
        from tqdm import tqdm

        args = self.args
        self.model.train()
        for m in self.model.modules():  # model hooks, e.g. airbench's whitening-bias freeze
            hook = getattr(m, "on_train_epoch", None)
            if callable(hook):
                hook(self.epoch)
        loader = self._train_loader(self.epoch)
        total_loss, correct, seen = 0.0, 0, 0
        bar = tqdm(loader, desc=f"epoch {self.epoch + 1}/{args.epochs}",
                   disable=args.no_progress or not self.dist.is_main, leave=False, dynamic_ncols=True)
        for batch in bar:
            if self.global_step >= self.total_steps or (args.max_steps is not None and self.global_step >= args.max_steps):
                break
            x, y = batch[0].to(self.device, non_blocking=True), batch[1].to(self.device, non_blocking=True)
            if self.batch_augment is not None:
                x = self.batch_augment(x, index=batch[2] if len(batch) > 2 else None, epoch=self.epoch)
            y_hard = y
            if self.mixup is not None:
                x, y = mix_batch(self.mixup, x, y, self.bundle.num_classes)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            x_out = next(self.outliers)[0].to(self.device) if self.outliers is not None else None
            self.model.head.on_step(self.global_step)
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                loss, logits = self.step_fn(x, y, x_out)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()} at step {self.global_step}")
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
            else:
                loss.backward()
            if args.clip_grad:
                nn.utils.clip_grad_norm_(self.model.parameters(), args.clip_grad)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.global_step += 1
            self.scheduler.step_update(self.global_step)
            if self.averager is not None:
                self.averager.after_step(self.model, self.global_step)
            n = y.shape[0]
            total_loss += float(loss.detach()) * n
            correct += int((logits.argmax(1) == y_hard).sum())
            seen += n
            bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}")
        total_loss, correct, seen = all_reduce_sum([total_loss, correct, seen], self.device, self.dist)
        return {"train_loss": total_loss / max(seen, 1), "train_acc": correct / max(seen, 1)}

    def init_from_data(self) -> None:
        """Call the model's data-dependent initialisation hooks (``init_from_data(images)``, e.g. airbench's
        patch whitening) with the first ``init_data_size`` normalised, un-augmented training images."""
        hooks = [m for m in self.model.modules() if callable(getattr(m, "init_from_data", None))]
        if not hooks:
            return
        ds = self.bundle.train_eval
        n = min(len(ds), max(int(getattr(m, "init_data_size", 5000)) for m in hooks))
        images = torch.stack([torch.as_tensor(ds[i][0]) for i in range(n)]).to(self.device)
        for m in hooks:
            m.init_from_data(images[: int(getattr(m, "init_data_size", n))])

    def _start_averaging(self) -> None:
        args = self.args
        if args.weight_averaging == "none":
            return
        planned = total_steps(argparse.Namespace(epochs=args.epochs, max_steps=None), self.steps_per_epoch)
        self.averager = WeightAverager(self.model, args.weight_averaging, planned, args.wa_every, args.wa_decay,
                                       args.wa_power)
        if self._averager_state is not None:
            self.averager.load_state_dict(self._averager_state)

    def precision_note(self) -> str:
        """How the run computes: float32, or the autocast dtype, with why ``--amp auto`` chose it."""
        if not self.amp_dtype:
            return "float32"
        text = "autocast " + str(self.amp_dtype).replace("torch.", "")
        if self.scaler is not None:
            text += " with a grad scaler"
        if self.args.amp == "auto":
            text += " (--amp auto: CUDA, --amp-dtype)" if self.device.type == "cuda" else " (--amp auto: native bf16 on this CPU)"
        return text

    def fit(self) -> Dict[str, Any]:
        args, main = self.args, self.dist.is_main
        last = os.path.join(self.run_dir, "last.pt")
        if main:
            os.makedirs(self.run_dir, exist_ok=True)
            remove_stale_temp_files(self.run_dir)
        if os.path.exists(last):
            if not args.resume:
                raise FileExistsError(
                    f"run folder {self.run_dir!r} already holds a checkpoint; pass --resume to continue it "
                    f"or --name to start another run"
                )
            self.resume(last)
            if main:
                print(f"resumed {last} at epoch {self.epoch}, step {self.global_step}", flush=True)
                for note in self.sync_run_files():
                    print(note, file=sys.stderr if note.startswith("warning:") else sys.stdout, flush=True)
        else:
            self.init_from_data()
        self._start_averaging()
        if main:
            print(f"training {args.model} with {args.loss} on {self.device.type}: {self.precision_note()}, "
                  f"{self.steps_per_epoch} steps per epoch, {self.total_steps} steps in all", flush=True)
        barrier(self.dist)
        if main:
            atomic_write_text(os.path.join(self.run_dir, "config.yaml"), yaml.safe_dump(to_dict(args), sort_keys=True))
        done_now = 0
        while self.epoch < math.ceil(args.epochs):
            if self.global_step >= self.total_steps:
                break
            t0 = time.time()
            row = self.train_epoch()
            self.epoch += 1
            if main:
                val = classification_metrics(*predict(self.model, self.val_loader, self.device))
                row.update(epoch=self.epoch, step=self.global_step, lr=self.optimizer.param_groups[0]["lr"],
                           val_loss=val["loss"], val_acc=val["acc"], val_ece=val["ece"], seconds=time.time() - t0)
                self.log_rows.append(row)
                improved = val["acc"] > self.best_val_acc or args.keep == "last"
                if improved:
                    self.best_val_acc, self.best_epoch = val["acc"], self.epoch
                state = self.state()
                # last.pt first: it is the record; best.pt and log.csv follow from it, and a run killed
                # between these writes gets them back on --resume (sync_run_files).
                save_checkpoint(last, state)
                if improved:  # the weights and the record; the training state lives in last.pt only
                    save_checkpoint(os.path.join(self.run_dir, "best.pt"), weights_only(state))
                self._write_log()
                print(f"epoch {self.epoch}/{args.epochs}  loss {row['train_loss']:.4f}  train acc {row['train_acc']:.4f}  "
                      f"val acc {val['acc']:.4f}  val ece {val['ece']:.4f}  ({row['seconds']:.1f}s)", flush=True)
            barrier(self.dist)
            done_now += 1
            if args.stop_after_epochs is not None and done_now >= args.stop_after_epochs:
                break
        if main and not os.path.exists(last):  # nothing to run (e.g. max_steps=0): still leave a checkpoint
            save_checkpoint(last, self.state())
        barrier(self.dist)
        return {"run_dir": self.run_dir, "epoch": self.epoch, "global_step": self.global_step,
                "best_val_acc": self.best_val_acc, "is_main": main}

