"""Training configuration: argparse defaults, overridden by a YAML file, overridden by the command line.

timm's convention: ``-c/--config FILE`` is read first and fed to ``parser.set_defaults``, so the file
is the default and flags win. A key in the file that is not a known option is an error that names
the key and lists the valid ones.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Dict, List, Optional, Sequence

import yaml

from ..errors import UserInputError
from .augment import AUGMENT_MODES, AUTO_AUGMENTS, FLIP_MODES, PAD_MODES, resolve_augment_mode
from .averaging import AVERAGING_MODES
from .tta import TTA_LEVELS
from .cli import list_type, parse_list
from .plugins import add_plugin_option, load_plugins, plugin_list
from .mixup import check_soft_targets


#: Values of the options added after the first release that reproduce what runs did before them, so a
#: saved configuration without them reads as what it ran (an old RGB run had no augmentation).
LEGACY_CONFIG: Dict[str, Any] = {
    "augment": "none", "crop_padding": 4, "auto_augment": "none", "reprob": 0.0, "mixup": 0.0,
    "cutmix": 0.0, "mixup_prob": 1.0, "mixup_switch_prob": 0.5, "device_augment": "auto",
    "small_stem": False, "nesterov": True, "test_folder": None, "decode_once": False, "cache_dir": None,
    "flip_mode": "random", "crop_pad_mode": "constant", "sched": "cosine", "lr_start_factor": 0.01,
    "lr_end_factor": 0.0, "lr_scale": {}, "weight_decay_1d": False, "weight_averaging": "none",
    "wa_every": 5, "wa_decay": 0.95 ** 5, "wa_power": 3.0, "tta": 0, "keep": "best",
}

#: Values of ``--amp``: True / False, or ``"auto"`` (bf16 where the CPU computes it natively).
AMP_CHOICES = ("auto", "on", "off")


def _amp_value(text: Any) -> Any:
    if isinstance(text, bool) or text == "auto":
        return text
    low = str(text).lower()
    if low in ("on", "true", "1", "yes"):
        return True
    if low in ("off", "false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"--amp must be one of {AMP_CHOICES}, got {text!r}")


class ConfigError(UserInputError):
    """A configuration file or value is invalid."""


def json_object(flag: str):
    """An argparse type: the option's value as a JSON object, or an error naming ``flag``."""
    def parse(text: str) -> Dict[str, Any]:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise argparse.ArgumentTypeError(f"{flag} must be a JSON object, got {text!r}: {err}")
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"{flag} must be a JSON object, got {text!r}")
        return value

    return parse


_json_dict = json_object("--loss-args")
_json_scales = json_object("--lr-scale")


def build_parser() -> argparse.ArgumentParser:
    """The options of ``train.py``; the defaults train resnet18 on the embedded digits set.

    One function on purpose: it is the single list of options (grouped as in ``--help``)."""
    p = argparse.ArgumentParser(
        description="Train a timm backbone with a lossbench loss.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("-c", "--config", default=None, help="YAML file whose keys set these options' defaults")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="digits", help="digits | mnist | fashionmnist | cifar10 | cifar100 | svhn | imagefolder:<path>")
    g.add_argument("--data-root", default=None, help="folder holding the data set files (default $LOSSBENCH_DATA or ./data)")
    g.add_argument("--download", action="store_true", help="let torchvision download a missing data set")
    g.add_argument("--img-size", type=int, default=32)
    g.add_argument("--channels", type=int, default=None, help="force 1 or 3 input channels")
    g.add_argument("--id-classes", type=list_type(int, "id_classes"), default=None, help="in-distribution classes, e.g. 0,1,2,3,4,5; others are held out as OOD")
    g.add_argument("--val-fraction", type=float, default=0.1)
    g.add_argument("--max-train-samples", type=int, default=None, help="keep a class-stratified subset of the training split")
    g.add_argument("--test-folder", default=None, help="imagefolder data: take the test split from this folder of class folders")
    g.add_argument("--decode-once", action=argparse.BooleanOptionalAction, default=True, help="imagefolder data: decode every image once into a uint8 tensor (same pixels)")
    g.add_argument("--cache-dir", default=None, help="keep decoded image folders on disk here (keyed by file list, sizes, mtimes, image size)")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--workers", type=int, default=0)
    g = p.add_argument_group("augmentation (training split only; eval splits and OOD fitting never)")
    g.add_argument("--augment", default="auto", choices=list(AUGMENT_MODES), help="auto: cifar (4-px-padded random crop + h-flip) for RGB, none for 1-channel data")
    g.add_argument("--crop-padding", type=int, default=4, help="zero padding of the random crop")
    g.add_argument("--auto-augment", default="none", choices=list(AUTO_AUGMENTS), help="torchvision RandAugment / TrivialAugmentWide")
    g.add_argument("--reprob", type=float, default=0.0, help="random erasing probability")
    g.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (timm Mixup; soft targets: losses in SOFT_TARGET_LOSSES only)")
    g.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (timm Mixup)")
    g.add_argument("--mixup-prob", type=float, default=1.0, help="probability of mixing a batch")
    g.add_argument("--mixup-switch-prob", type=float, default=0.5, help="probability of cutmix instead of mixup when both are on")
    g.add_argument("--device-augment", default="auto", choices=["auto", "on", "off"], help="crop/flip/normalise decoded uint8 batches on the device (auto: on CUDA)")
    g.add_argument("--flip-mode", default="random", choices=list(FLIP_MODES), help="alternating: airbench's derandomised flips (device augmentation only)")
    g.add_argument("--crop-pad-mode", default="constant", choices=list(PAD_MODES), help="padding of the random crop: zeros or reflect (airbench)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="resnet18", help="any timm.create_model name")
    g.add_argument("--pretrained", action="store_true", help="timm pretrained weights (needs the hub)")
    g.add_argument("--pretrained-file", default=None, help="local weights file for the backbone")
    g.add_argument("--drop-rate", type=float, default=0.0)
    g.add_argument("--small-stem", action=argparse.BooleanOptionalAction, default=False, help="ResNet family: 3x3 stride-1 first conv, no max-pool (for 32-px images)")
    g.add_argument("--loss", default="ce", help="a name from lossbench.list_losses()")
    g.add_argument("--loss-args", type=_json_dict, default={}, help="JSON object of loss hyper-parameters")
    g = p.add_argument_group("optimisation")
    g.add_argument("--opt", default="adamw", choices=["adamw", "sgd"])
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=True, help="SGD: Nesterov momentum (timm's 'sgd' default)")
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--epochs", type=float, default=15, help="may be fractional: training stops after ceil(epochs * steps per epoch) steps")
    g.add_argument("--warmup-epochs", type=float, default=1.0)
    g.add_argument("--min-lr", type=float, default=1e-5, help="cosine: the final learning rate")
    g.add_argument("--sched", default="cosine", choices=["cosine", "linear"], help="cosine (timm, warm-up from lr * lr_start_factor) or linear: lr_start_factor -> 1 -> lr_end_factor (airbench)")
    g.add_argument("--lr-start-factor", type=float, default=0.01, help="learning rate at step 0 as a fraction of the peak")
    g.add_argument("--lr-end-factor", type=float, default=0.0, help="linear schedule: final learning rate as a fraction of the peak")
    g.add_argument("--lr-scale", type=_json_scales, default={}, help='JSON {pattern: factor}: learning-rate factor for parameters whose name matches the regex (first match wins); "norm_bias" = biases of normalisation layers. The weight decay per step (lr * wd) is kept')
    g.add_argument("--weight-decay-1d", action=argparse.BooleanOptionalAction, default=False, help="decay biases and other 1-D parameters too (timm's default exempts them)")
    g.add_argument("--weight-averaging", default="none", choices=list(AVERAGING_MODES), help="lookahead (airbench) or ema of the weights every --wa-every steps; the final weights are the average")
    g.add_argument("--wa-every", type=int, default=5, help="steps between weight-average updates")
    g.add_argument("--wa-decay", type=float, default=0.95 ** 5, help="decay of the average at the last step (airbench: 0.95^5)")
    g.add_argument("--wa-power", type=float, default=3.0, help="decay at step t is wa_decay * (t / T) ** wa_power")
    g.add_argument("--clip-grad", type=float, default=None)
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many optimisation steps in total")
    g = p.add_argument_group("auxiliary outliers: energy-bounded fine-tuning (Liu et al. 2020) or Outlier Exposure (Hendrycks et al. 2019)")
    g.add_argument("--outlier-data", default=None, help="OOD set name used as auxiliary outliers in training (e.g. gaussian, uniform, a data set name)")
    g.add_argument("--outlier-loss", default="energy", choices=["energy", "oe"], help="term on the outliers: energy margins (--energy-weight, --m-in, --m-out) or OE's cross-entropy to uniform (--oe-weight)")
    g.add_argument("--oe-weight", type=float, default=0.5, help="lambda of Outlier Exposure (official: 0.5)")
    g.add_argument("--energy-weight", type=float, default=0.1)
    g.add_argument("--m-in", type=float, default=-23.0)
    g.add_argument("--m-out", type=float, default=-5.0)
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--output", default="runs", help="parent folder of run folders")
    g.add_argument("--name", default=None, help="run folder name (default: <data>-<model>-<loss>)")
    g.add_argument("--resume", action="store_true", help="continue from <run>/last.pt if it exists")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    g.add_argument("--amp", nargs="?", const=True, default=False, type=_amp_value, help="mixed precision: bf16 autocast on CPU; on CUDA --amp-dtype. --amp auto: on where bf16 is native (CPU flag avx512_bf16 / amx_bf16, or CUDA), else float32")
    g.add_argument("--no-amp", dest="amp", action="store_const", const=False, help="force float32")
    g.add_argument("--tta", type=int, default=0, choices=list(TTA_LEVELS), help="test-time augmentation level for accuracy figures (0 none, 1 flips, 2 flips + 1-px translations); OOD scores never use it")
    g.add_argument("--amp-dtype", default="float16", choices=["float16", "bfloat16"], help="autocast dtype on CUDA (float16 uses a grad scaler)")
    g.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    g.add_argument("--compile", action="store_true", help="torch.compile the training step")
    g.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=True, help="SyncBatchNorm under DDP on GPUs")
    g.add_argument("--keep", default="best", choices=["best", "last"], help="what best.pt holds: the epoch of best validation accuracy, or the last epoch (recipes whose final weights are the average)")
    add_plugin_option(g)
    g.add_argument("--stop-after-epochs", type=int, default=None, help="exit after this many epochs of this invocation (for tests of resume)")
    return p


def config_keys(parser: argparse.ArgumentParser) -> List[str]:
    return sorted(a.dest for a in parser._actions if a.dest not in ("help", "config"))


def load_yaml(path: str) -> Dict[str, Any]:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except yaml.YAMLError as err:  # a syntax error: say where, on one line
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or " ".join(str(err).split())
        raise ConfigError(f"config file {path!r} is not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of option: value, got {type(data).__name__}")
    return data


def apply_config(parser: argparse.ArgumentParser, data: Dict[str, Any], source: str) -> None:
    """Set ``parser``'s defaults from ``data`` (keys may use '-' or '_'); unknown keys are an error."""
    valid = config_keys(parser)
    clean: Dict[str, Any] = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in valid:
            raise ConfigError(f"unknown config key {key!r} in {source}; valid keys are: {', '.join(valid)}")
        if dest == "loss_args" and value is not None and not isinstance(value, dict):
            raise ConfigError(f"config key 'loss_args' in {source} must be a mapping, got {value!r}")
        if dest == "plugin":
            try:
                value = plugin_list(value)
            except UserInputError as err:
                raise ConfigError(f"{err} in {source}") from None
        if dest == "id_classes" and value is not None:
            try:
                value = parse_list(value, int, "id_classes")
            except UserInputError as err:
                raise ConfigError(f"{err} in {source}") from None
        clean[dest] = {} if dest == "loss_args" and value is None else value
    parser.set_defaults(**clean)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Resolve the configuration: defaults < ``--config`` file < command-line flags.

    The ``plugin`` modules (file and flags) are imported before :func:`validate` checks the loss name.
    """
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        apply_config(parser, load_yaml(pre.config), pre.config)
    args = parser.parse_args(argv)
    load_plugins(args.plugin)
    validate(args)
    return args


def validate(args: argparse.Namespace) -> None:
    for name in ("batch_size", "img_size"):
        if getattr(args, name) is None or getattr(args, name) <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {getattr(args, name)!r}")
    if not isinstance(args.epochs, (int, float)) or isinstance(args.epochs, bool) or not args.epochs > 0:
        raise ConfigError(f"epochs must be a positive number, got {args.epochs!r}")
    if isinstance(args.epochs, float) and args.epochs.is_integer():
        args.epochs = int(args.epochs)
    validate_optim(args)
    if args.lr <= 0:
        raise ConfigError(f"lr must be > 0, got {args.lr}")
    if not 0 < args.val_fraction < 1:
        raise ConfigError(f"val_fraction must be in (0, 1), got {args.val_fraction}")
    if args.channels not in (None, 1, 3):
        raise ConfigError(f"channels must be 1 or 3, got {args.channels}")
    check_loss_args(args.loss, args.loss_args)
    validate_augment(args)


def validate_optim(args: argparse.Namespace) -> None:
    """Check the schedule, learning-rate scales, weight averaging and amp keys (YAML bypasses argparse)."""
    import re

    for key, allowed in (("sched", ("cosine", "linear")), ("weight_averaging", AVERAGING_MODES),
                         ("tta", TTA_LEVELS)):
        if getattr(args, key) not in allowed:
            raise ConfigError(f"{key} must be one of {list(allowed)}, got {getattr(args, key)!r}")
    try:
        args.amp = _amp_value(args.amp)
    except argparse.ArgumentTypeError as err:
        raise ConfigError(str(err)) from None
    for key in ("lr_start_factor", "lr_end_factor"):
        if not 0.0 <= float(getattr(args, key)) <= 1.0:
            raise ConfigError(f"{key} must lie in [0, 1], got {getattr(args, key)!r}")
    if not isinstance(args.lr_scale, dict):
        raise ConfigError(f"lr_scale must be a mapping of name pattern -> factor, got {args.lr_scale!r}")
    for pattern, factor in args.lr_scale.items():
        try:
            re.compile(str(pattern))
        except re.error as err:
            raise ConfigError(f"lr_scale pattern {pattern!r} is not a regular expression: {err}") from None
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not float(factor) > 0:
            raise ConfigError(f"lr_scale[{pattern!r}] must be a positive number, got {factor!r}")
    if int(args.wa_every) < 1:
        raise ConfigError(f"wa_every must be >= 1, got {args.wa_every!r}")
    if not 0.0 <= float(args.wa_decay) <= 1.0:
        raise ConfigError(f"wa_decay must lie in [0, 1], got {args.wa_decay!r}")
    if float(args.wa_power) < 0:
        raise ConfigError(f"wa_power must be >= 0, got {args.wa_power!r}")


#: Head arguments the model sets (from the data and the backbone), never ``loss_args``.
MODEL_SET_LOSS_ARGS = ("num_classes", "in_features")


def check_loss_args(loss: str, loss_args: Any, what: str = "loss_args (--loss-args)") -> None:
    """:class:`ConfigError` for an unknown loss name or a ``loss_args`` key the loss does not take.

    Checked when the configuration is read, before any data is loaded; the values are checked by
    the loss itself when the model is built.
    """
    from ..registry import check_kwargs, get_loss_entry

    entry = get_loss_entry(loss)  # an unknown name lists the valid ones
    if not isinstance(loss_args, dict):
        raise ConfigError(f"{what} must be a mapping of hyper-parameters, got {loss_args!r}")
    fixed = sorted(set(loss_args) & set(MODEL_SET_LOSS_ARGS))
    if fixed:
        raise ConfigError(f"{what} sets {fixed}, which the model sets from the data and the backbone")
    try:
        check_kwargs(f"loss {entry.name!r}", entry.constructor, loss_args)
    except UserInputError as err:
        raise ConfigError(f"{what}: {err}") from None


def validate_augment(args: argparse.Namespace) -> None:
    """Check the augmentation keys (YAML values bypass argparse's choices) and resolve ``augment: auto``.

    ``auto`` becomes ``cifar`` for 3-channel data and ``none`` for 1-channel data, so the saved
    configuration says what ran. Mixup / CutMix with a loss that cannot take soft targets is refused.
    """
    from .data import native_channels

    for key, allowed in (("augment", AUGMENT_MODES), ("auto_augment", AUTO_AUGMENTS),
                         ("device_augment", ("auto", "on", "off")), ("flip_mode", FLIP_MODES),
                         ("crop_pad_mode", PAD_MODES)):
        if getattr(args, key) not in allowed:
            raise ConfigError(f"{key} must be one of {list(allowed)}, got {getattr(args, key)!r}")
    for key in ("reprob", "mixup_prob", "mixup_switch_prob"):
        if not 0.0 <= float(getattr(args, key)) <= 1.0:
            raise ConfigError(f"{key} must lie in [0, 1], got {getattr(args, key)!r}")
    for key in ("mixup", "cutmix", "crop_padding"):
        if float(getattr(args, key)) < 0:
            raise ConfigError(f"{key} must be >= 0, got {getattr(args, key)!r}")
    try:
        check_soft_targets(args.loss, args.mixup, args.cutmix)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    args.augment = resolve_augment_mode(args.augment, native_channels(args.data, args.channels))


def to_dict(args: argparse.Namespace) -> Dict[str, Any]:
    """The resolved configuration as a plain dict (what ``config.yaml`` of a run holds)."""
    return {k: v for k, v in sorted(vars(args).items()) if k != "config"}


def from_dict(data: Dict[str, Any]) -> argparse.Namespace:
    """Rebuild a namespace from a saved configuration; keys unknown to this version are an error."""
    parser = build_parser()
    apply_config(parser, {**LEGACY_CONFIG, **data}, "saved config")
    args = parser.parse_args([])
    return args
