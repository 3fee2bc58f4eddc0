"""A classifier that was not trained here, ready for :func:`~lossbench.experiments.evaluate_run.evaluate_model`.

``eval.py --model NAME --weights FILE --data SET --out DIR`` builds the architecture (a timm name, or
``torchvision:<name>``), loads the weights file, brings the data to the model's own input
normalisation and size, and wraps the model with :func:`ood.adapt_classifier` so that every score
finds its penultimate features and final linear layer. The evaluation itself is the one runs get.

Weights files: a plain ``state_dict`` (as ``torch.save(model.state_dict())`` writes it, possibly
under ``"state_dict"`` (timm's training script) or ``"model"`` (torchvision's reference scripts),
with DataParallel's ``module.`` / ``torch.compile``'s ``_orig_mod.`` prefixes), a ``.safetensors``
file, or a lossbench checkpoint (``last.pt``, or the weights-only ``best.pt``), whose own
configuration rebuilds the model. Files are read with ``torch.load(weights_only=True)``: only
tensors and plain containers (plus numpy's RNG-state arrays of lossbench checkpoints) are unpickled.

Input normalisation (mean, std), in order: ``--mean/--std``; torchvision's weights transforms
(``--tv-weights NAME``, else the architecture's ``DEFAULT`` weights, whose normalisation every
torchvision classification recipe shares); timm's ``resolve_data_config`` (the model's
``pretrained_cfg``); a lossbench checkpoint's own training data. Input size: ``--img-size``, else
an ``img_size`` given in ``--model-kwargs`` (timm keeps the pretrained size in its config), else the
size those sources name. Images are resized to that size as a whole; the centre crop of timm's
``crop_pct`` / torchvision's resize-then-crop is not applied (lossbench's data pipeline has no crop).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..errors import UserInputError
from ..framework.checkpoint import FORMAT_VERSION, CheckpointError
from ..integrity import zip_damage

#: Wrappers under which training scripts save the weights (timm: ``state_dict``; torchvision's
#: reference scripts: ``model``).
STATE_DICT_KEYS = ("state_dict", "model")
#: Key prefixes that wrappers add (DataParallel / DDP, ``torch.compile``).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: Pickled globals a lossbench checkpoint holds besides tensors (numpy's RNG state in ``last.pt``).
_NUMPY_GLOBALS = ("numpy.ndarray", "numpy.dtype", "numpy.core.multiarray._reconstruct",
                  "numpy._core.multiarray._reconstruct")
TORCHVISION_PREFIX = "torchvision:"


@dataclass
class WeightsFile:
    """The weights of one file: ``state_dict``; ``kind`` ``'state_dict'`` or ``'lossbench'``; for a
    lossbench checkpoint its whole ``checkpoint`` mapping (configuration, epoch, classes)."""

    path: str
    state_dict: Dict[str, torch.Tensor]
    kind: str
    checkpoint: Optional[Dict[str, Any]] = None


@dataclass
class InputSpec:
    """What the model takes: ``channels`` x ``size`` x ``size`` images normalised by ``mean`` / ``std``;
    ``source`` says where each came from (reported in ``metrics.json``)."""

    channels: int
    size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    source: Dict[str, str] = field(default_factory=dict)


def _allowed_global(name: str) -> bool:
    return name in _NUMPY_GLOBALS or (name.startswith("numpy.dtypes.") and name.endswith("DType"))


def _resolve_global(name: str) -> Any:
    import importlib

    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _torch_load(path: str, flag: str) -> Any:
    """``torch.load(path, weights_only=True)``, with numpy's RNG-state globals allowed (lossbench's
    ``last.pt``); any other pickled object is refused, naming it."""
    unsafe: List[str] = []
    try:
        unsafe = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a zip archive (legacy format): torch.load below says what it finds
        unsafe = []
    refused = sorted(g for g in unsafe if not _allowed_global(g))
    if refused:
        raise UserInputError(f"{flag} {path!r} holds pickled objects other than tensors ({', '.join(refused[:3])}"
                             f"{', ...' if len(refused) > 3 else ''}); save the model's state_dict() instead "
                             f"(torch.save(model.state_dict(), path)), which loads without running pickled code")
    allowed = []
    for g in unsafe:
        try:
            allowed.append(_resolve_global(g))
        except (ImportError, AttributeError):
            pass
    if "numpy.dtype" in unsafe:  # an array's dtype is rebuilt from its class (numpy >= 1.25: numpy.dtypes)
        import numpy as np

        allowed += [getattr(np.dtypes, n) for n in dir(getattr(np, "dtypes", object())) if n.endswith("DType")]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated, foreign or legacy-pickled file
        first = " ".join(str(err).split())[:300]
        raise UserInputError(f"{flag} {path!r} could not be read as a weights file ({type(err).__name__}: "
                             f"{first})") from None


def _strip_prefixes(sd: Mapping[str, Any]) -> Dict[str, Any]:
    out = {}
    for k, v in sd.items():
        key = str(k)
        changed = True
        while changed:
            changed = False
            for p in WRAPPER_PREFIXES:
                if key.startswith(p):
                    key, changed = key[len(p):], True
        out[key] = v
    return out


def read_weights(path: str, flag: str = "--weights") -> WeightsFile:
    """The weights in ``path`` (see the module docstring); one-line :class:`UserInputError` otherwise."""
    if not os.path.isfile(path):
        raise UserInputError(f"{flag} {path!r} does not exist")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:  # pragma: no cover - safetensors comes with timm
            raise UserInputError(f"{flag} {path!r} is a .safetensors file; pip install safetensors") from None
        try:
            return WeightsFile(path, _strip_prefixes(load_file(path, device="cpu")), "state_dict")
        except Exception as err:
            raise UserInputError(f"{flag} {path!r} could not be read as safetensors ({err})") from None
    damage = zip_damage(path)
    if damage is not None:
        raise CheckpointError(f"{flag} {path!r} is damaged: {damage}; it changed after it was written")
    obj = _torch_load(path, flag)
    if not isinstance(obj, Mapping):
        raise UserInputError(f"{flag} {path!r} holds a {type(obj).__name__}, not a state_dict (a mapping of "
                             f"parameter names to tensors)")
    if "format_version" in obj and "config" in obj and "model" in obj:
        if obj["format_version"] != FORMAT_VERSION:
            raise CheckpointError(f"{flag} {path!r} has format_version {obj['format_version']}, expected "
                                  f"{FORMAT_VERSION}")
        return WeightsFile(path, dict(obj["model"]), "lossbench", dict(obj))
    sd: Any = obj
    for key in STATE_DICT_KEYS:
        if isinstance(obj.get(key), Mapping):
            sd = obj[key]
            break
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad or not sd:
        what = f"entries that are not tensors ({', '.join(map(str, bad[:3]))})" if bad else "no tensors"
        raise UserInputError(f"{flag} {path!r} is not a state_dict: it has {what}; expected parameter names "
                             f"-> tensors, possibly under {' or '.join(repr(k) for k in STATE_DICT_KEYS)}")
    return WeightsFile(path, _strip_prefixes(sd), "state_dict")


def _first(keys: Sequence[str], n: int = 4) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_weights_into(model: nn.Module, weights: WeightsFile, what: str, flag: str = "--weights") -> None:
    """``model.load_state_dict`` of ``weights`` (strict), or one line naming the file, the model and the
    first missing / unexpected / mis-shaped keys. BatchNorm's ``num_batches_tracked`` counters (unused
    in evaluation, absent from some files) may be missing."""
    own = model.state_dict()
    sd = weights.state_dict
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} (file {tuple(sd[k].shape)}, model {tuple(own[k].shape)})" for k in own
              if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = ([f"missing keys {_first(missing)}"] if missing else []) + (
            [f"unexpected keys {_first(unexpected)}"] if unexpected else []) + (
            [f"shape mismatch {_first(shapes, 2)}"] if shapes else [])
        raise CheckpointError(f"{flag} {weights.path!r} does not fit {what}: " + "; ".join(parts))
    model.load_state_dict(sd, strict=False)


def _parse_model(name: str) -> Tuple[str, str]:
    """``('torchvision', name)`` or ``('timm', name)``."""
    if name.startswith(TORCHVISION_PREFIX):
        return "torchvision", name[len(TORCHVISION_PREFIX):]
    return "timm", name


def _check_timm_name(name: str, arch: str) -> None:
    import timm

    from ..framework import nets  # noqa: F401  (lossbench's own networks, registered with timm)

    if not timm.is_model(arch):
        near = timm.list_models(f"*{arch.split('.')[0]}*")[:5]
        raise UserInputError(f"--model {name!r}: not a timm model name (see timm.list_models())"
                             + (f"; similar: {', '.join(near)}" if near else "")
                             + f"; torchvision models are named {TORCHVISION_PREFIX}<name>")


def _check_torchvision_name(name: str, arch: str) -> None:
    from torchvision import models as tvm

    if arch not in tvm.list_models(module=tvm):
        raise UserInputError(f"--model {name!r}: no torchvision classification model {arch!r}; expected one "
                             f"of torchvision.models.list_models() (e.g. resnet18, vit_b_16)")


def check_model_name(name: str) -> None:
    """:class:`UserInputError` unless ``name`` is a timm model name or ``torchvision:<classification model>``."""
    lib, arch = _parse_model(name)
    (_check_torchvision_name if lib == "torchvision" else _check_timm_name)(name, arch)


def build_architecture(name: str, num_classes: int, model_kwargs: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """A randomly initialised ``name`` (a timm name or ``torchvision:<name>``) with ``num_classes`` outputs."""
    check_model_name(name)
    lib, arch = _parse_model(name)
    kwargs = dict(model_kwargs or {})
    try:
        if lib == "torchvision":
            from torchvision import models as tvm

            return tvm.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
        import timm

        return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError, AssertionError) as err:
        raise UserInputError(f"--model {name!r} with --model-kwargs {kwargs}: {err}") from None


def _square(size: Any, what: str) -> int:
    if isinstance(size, (list, tuple)):
        if len(set(int(s) for s in size)) != 1:
            raise UserInputError(f"{what} is {tuple(size)}, not square; lossbench's data are square images: "
                                 f"pass --img-size")
        return int(size[0])
    return int(size)


def input_spec(name: Optional[str], model_kwargs: Optional[Mapping[str, Any]] = None,
               mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
               img_size: Optional[int] = None, tv_weights: Optional[str] = None,
               checkpoint: Optional[Mapping[str, Any]] = None) -> InputSpec:
    """The input channels, size and normalisation of model ``name`` (see the module docstring for the
    order); ``checkpoint``: a lossbench checkpoint, whose training data decide. No model is built."""
    from ..framework.data import data_stats, resolve_stats

    kwargs = dict(model_kwargs or {})
    source: Dict[str, str] = {}
    if checkpoint is not None:
        cfg = checkpoint["config"]
        m0, s0, channels = data_stats(cfg["data"], cfg.get("channels"))
        size0: Any = cfg["img_size"]
        source["normalisation"] = source["size"] = f"the run's training data ({cfg['data']})"
    elif name is None:
        raise UserInputError("--model must name the architecture (a timm name or torchvision:<name>)")
    elif _parse_model(name)[0] == "torchvision":
        from torchvision import models as tvm

        arch = _parse_model(name)[1]
        _check_torchvision_name(name, arch)
        enum = tvm.get_model_weights(arch)
        if tv_weights is not None:
            try:
                w = enum[tv_weights]
            except KeyError:
                raise UserInputError(f"--tv-weights {tv_weights!r} is not a weights name of {arch}; expected one "
                                     f"of {[e.name for e in enum]}") from None
            origin = f"torchvision {w} transforms"
        else:
            w = enum.DEFAULT
            origin = f"torchvision {w} transforms (the architecture's DEFAULT weights)"
        t = w.transforms()
        m0, s0, channels, size0 = tuple(t.mean), tuple(t.std), 3, t.crop_size
        source["normalisation"] = source["size"] = origin
    else:
        import timm
        from timm.data import resolve_data_config

        arch = _parse_model(name)[1]
        _check_timm_name(name, arch)
        pcfg = timm.get_pretrained_cfg(arch)
        cfg = resolve_data_config({}, pretrained_cfg=pcfg.to_dict() if pcfg is not None else {})
        channels, size0 = int(kwargs.get("in_chans", cfg["input_size"][0])), tuple(cfg["input_size"][1:])
        m0, s0 = tuple(cfg["mean"]), tuple(cfg["std"])
        source["normalisation"] = source["size"] = (
            f"timm's resolve_data_config of {pcfg.architecture}.{pcfg.tag}" if pcfg is not None
            else "timm's defaults (no pretrained_cfg for this name)")
    if tv_weights is not None and (checkpoint is not None or name is None or _parse_model(name)[0] != "torchvision"):
        raise UserInputError("--tv-weights applies to torchvision:<name> models only")
    if "img_size" in kwargs and checkpoint is None:
        size0, source["size"] = kwargs["img_size"], "--model-kwargs img_size"
    if img_size is not None:
        size0, source["size"] = img_size, "--img-size"
    if mean is not None or std is not None:
        source["normalisation"] = "--mean / --std"
    m, s = resolve_stats(m0, s0, channels, mean, std)
    size = _square(size0, f"the input size ({source['size']})")
    if size <= 0:
        raise UserInputError(f"the input size must be a positive integer, got {size}")
    return InputSpec(channels, size, tuple(m), tuple(s), source)


def build_any_model(name: Optional[str], weights: Optional[WeightsFile], num_classes: int,
                    model_kwargs: Optional[Mapping[str, Any]] = None) -> Tuple[nn.Module, str]:
    """The model of ``name`` with ``weights`` loaded (``None``: random initialisation), and its name.

    A lossbench checkpoint rebuilds its own model from its configuration (``name``, if given, must be
    the same architecture); its number of classes must be the data's.
    """
    if weights is not None and weights.kind == "lossbench":
        from ..framework.builders import check_loss_registered
        from ..framework.config import from_dict
        from ..framework.data import data_stats
        from ..framework.models import create_model

        ckpt = weights.checkpoint or {}
        if model_kwargs:
            raise UserInputError(f"--model-kwargs does not apply to --weights {weights.path!r}, a lossbench "
                                 f"checkpoint: its configuration builds the model")
        args = from_dict(ckpt["config"])
        if name is not None and name != args.model:
            raise UserInputError(f"--model {name!r}, but --weights {weights.path!r} is a lossbench checkpoint of "
                                 f"{args.model!r}; leave --model out (the checkpoint names its model) or pass "
                                 f"--model {args.model}")
        classes = int(ckpt.get("num_classes") or len(ckpt.get("classes") or []) or 0)
        if classes and classes != num_classes:
            raise UserInputError(f"--weights {weights.path!r} is a classifier of {classes} classes, the data has "
                                 f"{num_classes}; evaluate it on data with the same classes (--data, --id-classes)")
        check_loss_registered(args.loss, getattr(args, "plugin", None), weights.path)
        model = create_model(args.model, num_classes, args.loss, args.loss_args,
                             in_chans=data_stats(args.data, args.channels)[2], small_stem=args.small_stem,
                             drop_rate=args.drop_rate)
        load_weights_into(model, weights, f"its configuration's model ({args.model} + {args.loss} head)")
        return model, f"{args.model} ({args.loss} head, lossbench checkpoint)"
    if name is None:
        raise UserInputError("--weights is a plain state_dict: --model must name its architecture (a timm name "
                             "or torchvision:<name>)")
    model = build_architecture(name, num_classes, model_kwargs)
    if weights is not None:
        load_weights_into(model, weights, f"{name} with {num_classes} classes (the data's)"
                          + (f" and --model-kwargs {dict(model_kwargs)}" if model_kwargs else ""))
    return model, name


#: Why evaluating random weights needs ``--random-init``.
RANDOM_INIT_REASON = ("without --weights the model would have random weights, and its accuracy and OOD figures "
                      "would describe no trained classifier (silently meaningless numbers)")


def evaluate_any_model(model: Optional[str], weights: Optional[str], data: str, random_init: bool = False,
                       model_kwargs: Optional[Mapping[str, Any]] = None, mean: Optional[Sequence[float]] = None,
                       std: Optional[Sequence[float]] = None, img_size: Optional[int] = None,
                       tv_weights: Optional[str] = None, data_root: Optional[str] = None,
                       test_folder: Optional[str] = None, id_classes: Optional[Sequence[int]] = None,
                       max_train_samples: Optional[int] = None, val_fraction: float = 0.1, seed: int = 0,
                       device: str = "auto", **evaluate_kwargs: Any) -> Dict[str, Any]:
    """:func:`~lossbench.experiments.evaluate_run.evaluate_model` on a model trained elsewhere.

    ``model``: a timm name or ``torchvision:<name>`` (may be ``None`` for a lossbench checkpoint);
    ``weights``: its weights file (``None`` only with ``random_init``); ``data`` (+ ``test_folder``,
    ``id_classes``, ...): the in-distribution set, brought to the model's input (:func:`input_spec`);
    ``evaluate_kwargs`` go to ``evaluate_model`` (OOD sets, scores, ...). The result has the run
    evaluation's keys plus ``model``: its name, weights, input and how the adapter found its features.
    """
    from ood import adapt_classifier

    from ..framework.data import get_data
    from ..framework.runtime import select_device
    from .evaluate_run import evaluate_model

    if weights is None and not random_init:
        raise UserInputError(f"--model {model!r} needs --weights FILE: {RANDOM_INIT_REASON}; pass --random-init "
                             f"to evaluate random weights on purpose (e.g. as a chance-level reference)")
    if weights is not None and random_init:
        raise UserInputError("--random-init and --weights exclude each other")
    if model is not None and weights is None:
        check_model_name(model)
    dev = select_device(device)  # a device that is not there: said before anything is loaded
    w = read_weights(weights) if weights is not None else None
    spec = input_spec(model, model_kwargs, mean, std, img_size, tv_weights,
                      checkpoint=w.checkpoint if w is not None and w.kind == "lossbench" else None)
    bundle = get_data(data, root=data_root, img_size=spec.size, channels=spec.channels, seed=seed,
                      id_classes=id_classes, val_fraction=val_fraction, max_train_samples=max_train_samples,
                      test_folder=test_folder, mean=spec.mean, std=spec.std)
    if random_init:
        torch.manual_seed(seed)
    net, described = build_any_model(model, w, bundle.num_classes, model_kwargs)
    adapted = adapt_classifier(net).to(dev).eval()
    evaluate_kwargs.setdefault("data_root", data_root)
    evaluate_kwargs.setdefault("seed", seed)
    result = evaluate_model(adapted, bundle, **evaluate_kwargs)
    info = {"name": described, "weights": os.path.abspath(weights) if weights is not None else None,
            "weights_kind": w.kind if w is not None else "random init",
            "input": {"channels": spec.channels, "size": spec.size, "mean": list(spec.mean), "std": list(spec.std),
                      "from": dict(spec.source)},
            "features": getattr(adapted, "source", "the model's own features interface (timm / lossbench)"),
            "data": data, "num_classes": bundle.num_classes, "classes": list(bundle.classes)}
    head: Dict[str, Any] = {"checkpoint": info["weights"], "model": info}
    if w is not None and w.kind == "lossbench":
        head.update(epoch=int((w.checkpoint or {}).get("epoch", 0)), config=(w.checkpoint or {}).get("config"))
    return {**head, **result}
