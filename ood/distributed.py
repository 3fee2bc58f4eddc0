"""Feature passes shared out over the ranks of a process group (``torchrun``), then gathered.

Where a process group is initialised with ``W > 1`` ranks and the loader is a plain, ordered
:class:`~torch.utils.data.DataLoader` (sequential sampler, no ``drop_last``, a sized map-style
data set), each rank runs the model on a contiguous run of the loader's own batches -- batch ``k``
of rank ``r`` is batch ``r * nb // W + k`` of the single-process loader, ``nb`` batches in all --
so every sample is computed in exactly the batch it would be in a single process. The per-rank
results (different lengths) are gathered the usual way for ``all_gather`` (which needs equal
shapes): pad to the longest, gather, trim, concatenate in rank order. Every rank ends with the
whole data in the original order, identical to a single process. Any other loader runs whole on
every rank, as without a process group.
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, SequentialSampler, Subset


#: Label dtypes carried over (sent as int64 or float64, given back in their own dtype); labels of another
#: dtype or not of shape (N,) are dropped (None).
LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
                torch.float64, torch.float32, torch.float16)


def world() -> Tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_share(loader: Iterable) -> Optional[DataLoader]:
    """This rank's share of ``loader`` (a loader over a contiguous run of its batches, see the module
    docstring), or ``None`` when the loader is to run whole (no process group, one rank, or a loader
    whose order cannot be split: shuffled, custom sampler, ``drop_last``, iterable data set)."""
    rank, w = world()
    if w <= 1 or not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return None
    if not isinstance(loader.sampler, SequentialSampler) or loader.batch_size is None or loader.drop_last:
        return None
    try:
        n = len(loader.dataset)  # type: ignore[arg-type]
    except TypeError:
        return None
    b = loader.batch_size
    nb = -(-n // b)
    lo, hi = min(n, (rank * nb // w) * b), min(n, ((rank + 1) * nb // w) * b)
    return DataLoader(Subset(loader.dataset, range(lo, hi)), batch_size=b, shuffle=False,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                      worker_init_fn=loader.worker_init_fn, timeout=loader.timeout)


def _comm_device() -> torch.device:
    """Where collective tensors live: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_true(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank (a collective: every rank must call it)."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def gather_rows(local: Optional[Tensor], trailing: Tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """All ranks' ``local`` row blocks (``(n_r, *trailing)``; ``None`` = no rows) concatenated in rank
    order on every rank (CPU): lengths gathered, each block padded to the longest, gathered, trimmed."""
    _, w = world()
    dev = _comm_device()
    n = 0 if local is None else int(local.shape[0])
    sizes = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(w)]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.int64, device=dev))
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    buf = torch.zeros((longest, *trailing), dtype=dtype, device=dev)
    if n:
        buf[:n] = local.to(dev, dtype)
    parts = [torch.empty_like(buf) for _ in range(w)]
    dist.all_gather(parts, buf)
    return torch.cat([p[:c].cpu() for p, c in zip(parts, counts)])


def gather_feature_data(feats: Optional[Tensor], logits: Optional[Tensor],
                        labels: Optional[Tensor]) -> Optional[Tuple[Tensor, Tensor, Optional[Tensor]]]:
    """(features, logits, labels) of every rank in rank order; a rank with no rows passes ``None``s.
    Shapes and the labels' presence and dtype (:data:`LABEL_DTYPES`) are agreed first, so an empty rank
    can take part; ``None`` when no rank has a row."""
    _, w = world()
    dev = _comm_device()
    if feats is None:
        meta = torch.tensor([-1, -1, -1], dtype=torch.int64, device=dev)
    else:
        known_labels = labels is not None and labels.dim() == 1 and labels.dtype in LABEL_DTYPES
        kind = 1 + LABEL_DTYPES.index(labels.dtype) if known_labels else 0
        meta = torch.tensor([feats.shape[1], logits.shape[1], kind], dtype=torch.int64, device=dev)
    metas: List[Tensor] = [torch.empty_like(meta) for _ in range(w)]
    dist.all_gather(metas, meta)
    known = [m.tolist() for m in metas if m[0] >= 0]
    if not known:
        return None
    d, c, kind = known[0]
    f = gather_rows(feats, (d,), torch.float32)
    z = gather_rows(logits, (c,), torch.float32)
    y = None
    if kind:
        dtype = LABEL_DTYPES[kind - 1]
        y = gather_rows(labels, (), torch.float64 if dtype.is_floating_point else torch.int64).to(dtype)
    return f, z, y
