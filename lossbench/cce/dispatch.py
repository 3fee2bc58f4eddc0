"""How a cut cross-entropy pass runs: rows per logits block and which implementation.

:func:`block_rows` sizes the R x V logits block from a per-device memory budget;
:func:`resolve_impl` picks the compiled extension (``ext``) or plain PyTorch (``torch``, see
:mod:`lossbench.cce.reference`) and :func:`_run` calls the chosen one.

``impl='auto'`` uses the extension only where its kernels have passed the tests (:func:`auto_uses_ext`):
on the CPU, and on CUDA GPUs of a compute capability listed in ``VERIFIED_CUDA_CAPABILITIES`` (the
CUDA cases of tests/cce passed there: 143 of them on an H200, sm_90, torch 2.11, CUDA 13.0). On any
other GPU ``'auto'`` means ``'torch'`` and the kernels run only with ``impl='ext'``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from . import ext
from .reference import RunResult, torch_run

IMPLS = ("auto", "torch", "ext")
# Compute capabilities on which the CUDA cases of tests/cce (``pytest tests/cce -k cuda``, as
# bench/gpu.sh runs them) have passed with the CUDA kernels built; impl='auto' keeps CUDA tensors of
# any other GPU on the pure-PyTorch pass. Add a capability only after that run has passed on it.
VERIFIED_CUDA_CAPABILITIES: Tuple[Tuple[int, int], ...] = ((9, 0),)
# Budget for the R x V logits block, in elements, per device type (float32: CPU 48 MiB, CUDA
# 256 MiB), and the fewest rows a block gets whatever V (below ~256 rows the CPU GEMMs lose
# 20-40 % of their rate), so above V = budget / MIN_BLOCK_ROWS (49,152 on CPU) the default block
# exceeds the budget; pass ``rows_per_block`` to cap it.
ROW_BLOCK_ELEMENTS: Dict[str, int] = {"cpu": 3 << 22, "cuda": 1 << 26}
MIN_BLOCK_ROWS: Dict[str, int] = {"cpu": 256, "cuda": 256}
MAX_BLOCK_ROWS: Dict[str, int] = {"cpu": 1024, "cuda": 8192}
_DEFAULT_BLOCK_ELEMENTS = 1 << 24


#: Device types on which a filtered pass orders the vocabulary by batch-mean logit by default. On
#: CUDA it is off: at the Gemma-2 head (bf16, N = 8192, D = 2304, V = 256,000) on an H200 our
#: kernels took 0.395 s sorted and 0.229 s unsorted, 78 % of the tiles skipped either way (docs/cce.md).
SORT_VOCAB_BY_DEFAULT: Tuple[str, ...] = ("cpu",)


def sort_vocab_default(device: torch.device) -> bool:
    """Whether ``sort_vocab=None`` sorts the vocabulary of a filtered pass on ``device``."""
    return torch.device(device).type in SORT_VOCAB_BY_DEFAULT


def block_rows(n: int, v: int, device: torch.device) -> int:
    """Rows per block: ``ROW_BLOCK_ELEMENTS // V`` within ``[MIN_BLOCK_ROWS, MAX_BLOCK_ROWS]``."""
    budget = ROW_BLOCK_ELEMENTS.get(device.type, _DEFAULT_BLOCK_ELEMENTS)
    rows = max(1, budget // max(1, v))
    rows = max(MIN_BLOCK_ROWS.get(device.type, 1), min(MAX_BLOCK_ROWS.get(device.type, rows), rows))
    if rows > 16:
        rows -= rows % 16
    return max(1, min(rows, max(1, n)))


def cuda_capability(device: torch.device) -> Optional[Tuple[int, int]]:
    """The compute capability of CUDA ``device``, or ``None`` where it cannot be read."""
    try:
        return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]
    except (RuntimeError, AssertionError, ValueError):
        return None


def auto_uses_ext(device: torch.device) -> bool:
    """Whether ``impl='auto'`` may choose the extension for tensors on ``device``.

    CPU: yes. CUDA: only on a GPU whose compute capability is in ``VERIFIED_CUDA_CAPABILITIES``.
    Any other device: no (the extension has no kernels there).
    """
    device = torch.device(device)
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return cuda_capability(device) in VERIFIED_CUDA_CAPABILITIES
    return False


def resolve_impl(impl: str, device: torch.device) -> str:
    """The implementation ``impl`` resolves to on ``device``: 'torch' or 'ext'.

    ``'auto'`` builds/loads the extension only where :func:`auto_uses_ext` allows it; ``'ext'``
    asks for it on any device and falls back to ``'torch'`` with a warning (an error under
    ``LOSSBENCH_REQUIRE_EXT=1``) where it is missing or has no kernels for the device.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch" or (impl == "auto" and not auto_uses_ext(device)):
        return "torch"
    if device.type not in ("cpu", "cuda"):
        ext.warn_fallback(f"it has no kernels for device {device}")
        return "torch"
    module = ext.load()
    if module is None:
        if impl == "ext":
            ext.warn_fallback("it could not be built")
        return "torch"
    if device.type == "cuda" and not module.has_cuda():
        ext.warn_fallback("it was built without CUDA kernels")
        return "torch"
    return "ext"


def _run(impl: str, *args: Any) -> RunResult:
    if impl == "ext":
        loss, lse, dE, dC, db, skipped, bad = ext.load().run(*args)  # type: ignore[union-attr]
        return loss, lse, dE, dC, db, int(skipped), int(bad)
    return torch_run(*args)
