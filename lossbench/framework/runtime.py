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


def amp_dtype(args: argparse.Namespace, device: torch.device) -> Optional[torch.dtype]:
    """Autocast dtype for ``--amp``: bf16 on CPU; on CUDA ``--amp-dtype`` (fp16 uses a grad scaler)."""
    if not args.amp:
        return None
    if device.type == "cpu":
        return torch.bfloat16
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}[args.amp_dtype]
