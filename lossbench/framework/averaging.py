"""Weight averaging during training: Lookahead-style averaging (airbench) and an EMA.

Every ``every`` optimisation steps the running average ``a`` of the model's floating-point state
(parameters and BatchNorm running statistics) is updated, ``a <- decay_t * a + (1 - decay_t) * w``,
with ``decay_t = decay * (t / T) ** power`` at step ``t`` of ``T``:

- ``lookahead``: the weights are then set to the average (``w <- a``), the "Lookahead" of
  ``legacy/airbench94.py`` (``LookaheadState``: every 5 steps, ``decay = 0.95 ** 5``, ``power = 3``);
- ``ema``: the average is kept beside the weights and copied into them when training ends.

At step ``T`` the weights become the average in both modes (airbench's final ``update(decay=1.0)``).
"""

from __future__ import annotations

from typing import Any, Dict

import torch
import torch.nn as nn

AVERAGING_MODES = ("none", "lookahead", "ema")


class WeightAverager:
    """Running average of ``model``'s floating-point ``state_dict`` entries (see the module docstring)."""

    def __init__(self, model: nn.Module, mode: str, total_steps: int, every: int = 5,
                 decay: float = 0.95 ** 5, power: float = 3.0):
        if mode not in AVERAGING_MODES[1:]:
            raise ValueError(f"mode must be one of {AVERAGING_MODES[1:]}, got {mode!r}")
        if int(every) < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if not 0.0 <= float(decay) <= 1.0:
            raise ValueError(f"decay must lie in [0, 1], got {decay}")
        if float(power) < 0:
            raise ValueError(f"power must be >= 0, got {power}")
        if int(total_steps) < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.mode, self.total_steps, self.every = mode, int(total_steps), int(every)
        self.decay, self.power = float(decay), float(power)
        self.average = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
        self.finished = False

    def decay_at(self, step: int) -> float:
        return self.decay * (min(step, self.total_steps) / self.total_steps) ** self.power

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        state = model.state_dict()
        for k, avg in self.average.items():
            avg.lerp_(state[k].detach().to(avg.dtype), 1.0 - decay)
            if self.mode == "lookahead":
                state[k].copy_(avg)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        state = model.state_dict()
        for k, avg in self.average.items():
            state[k].copy_(avg)

    def after_step(self, model: nn.Module, step: int) -> None:
        """Call after optimisation step ``step`` (counted from 1)."""
        if self.finished:
            return
        if step % self.every == 0:
            self.update(model, self.decay_at(step))
        if step >= self.total_steps:
            self.copy_to(model)
            self.finished = True

    def state_dict(self) -> Dict[str, Any]:
        return {"average": {k: v.clone() for k, v in self.average.items()}, "finished": self.finished}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        missing = set(self.average) - set(state["average"])
        if missing:
            raise KeyError(f"weight-average state lacks {sorted(missing)}")
        for k in self.average:
            self.average[k].copy_(state["average"][k])
        self.finished = bool(state.get("finished", False))
