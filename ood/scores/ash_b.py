"""ASH-B score: energy of binarised activations (top-k set to s1/k)."""

from __future__ import annotations

from ..registry import register_score
from .ash import ASH_DOC, _ASH, ash_b


@register_score("ash_b")
class ASHB(_ASH):
    __doc__ = ASH_DOC.format(
        what="ASH-B score: energy of binarised activations (top-k set to s1/k).",
        rule="set each kept entry to ``s1 / k`` with ``s1 = sum(h)`` before pruning, zero the rest",
        default_src="OpenOOD configs/postprocessors/ash.yml",
        note="OpenOOD's row named 'ASH' is this variant (``ASHNet.forward_threshold`` calls ``ash_b``).")
    name = "ash_b"
    _shape = staticmethod(ash_b)
