"""ASH-S score: energy of pruned activations scaled by exp(s1/s2)."""

from __future__ import annotations

from ..registry import register_score
from .ash import ASH_DOC, _ASH, ash_s


@register_score("ash_s")
class ASHS(_ASH):
    __doc__ = ASH_DOC.format(
        what="ASH-S score: energy of pruned activations scaled by exp(s1/s2).",
        rule="zero the rest and multiply the kept ones by ``exp(s1 / s2)`` (``s1`` sum before, ``s2`` after pruning; 0/0 for an all-zero row is taken as ratio 0)",
        default_src="the official ImageNet ResNet-50 config ``ash_s@90``; its CIFAR-10 DenseNet config uses 95",
        note="")
    name = "ash_s"
    _shape = staticmethod(ash_s)
