"""ASH-P score: energy of the top-k-pruned penultimate activations."""

from __future__ import annotations

from ..registry import register_score
from .ash import ASH_DOC, _ASH, ash_p


@register_score("ash_p")
class ASHP(_ASH):
    __doc__ = ASH_DOC.format(
        what="ASH-P score: energy of the top-k-pruned penultimate activations.",
        rule="zero the rest",
        default_src="OpenOOD's ASH percentile; the function default is 65",
        note="")
    name = "ash_p"
    _shape = staticmethod(ash_p)
