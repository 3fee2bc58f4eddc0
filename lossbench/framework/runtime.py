"""Run-time set-up shared by training and evaluation: device, seeding, RNG state, autocast dtype."""

from __future__ import annotations

import argparse
import random
from typing import Any, Dict, Optional

import numpy as np
import torch

from ..errors import UserInputError


def select_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"device {spec!r} (--device) was asked for but CUDA is not available here; "
                             f"use --device cpu, or auto (CUDA when there is one)")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively: x86 ``avx512_bf16`` or ``amx_bf16``, Arm ``bf16``
    (read from ``/proc/cpuinfo``; ``False`` where it cannot be read). Elsewhere bf16 autocast is
    emulated and much slower than float32."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags = set(value.split())
            return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    return False


def amp_dtype(args: argparse.Namespace, device: torch.device) -> Optional[torch.dtype]:
    """Autocast dtype for ``--amp``: bf16 on CPU; on CUDA ``--amp-dtype`` (fp16 uses a grad scaler).

    ``--amp auto``: bf16 on a CPU that computes it natively (:func:`cpu_has_native_bf16`), float32
    (``None``) on other CPUs; on CUDA as ``--amp``.
    """
    if not args.amp:
        return None
    if device.type == "cpu":
        if args.amp == "auto" and not cpu_has_native_bf16():
            return None
        return torch.bfloat16
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}[args.amp_dtype]
