"""Per-loader passes of the evaluation shared out over the ranks of a process group (``torchrun``), then gathered.

Where a process group is initialised with ``W > 1`` ranks and the loader is a plain, ordered
:class:`~torch.utils.data.DataLoader` (sequential sampler, no ``drop_last``, a sized map-style
data set), each rank runs the model on a contiguous run of the loader's own batches -- batch ``k``
of rank ``r`` is batch ``r * nb // W + k`` of the single-process loader, ``nb`` batches in all --
so every sample is computed in exactly the batch it would be in a single process (even a
computation that depends on the whole batch, such as FGSM's clamp to the batch range, sees the
same batch). The per-rank results (different lengths) are gathered the usual way for
``all_gather`` (which needs equal shapes): pad to the longest, gather, trim, concatenate in rank
order. Every rank ends with the whole data in the original order, identical to a single process.
Any other loader runs whole on every rank, as without a process group; without a process group
(or with one rank) nothing here makes a collective call.

Shared this way: the feature pass (:func:`ood.scores.feature_base.collect_features`), and through
:func:`shared_pass` every pass that gives one row per sample: the logits of the logit-only scores,
:meth:`ood.scores.base.OODScore.evaluate` (each loader's ``score``: ODIN, i-ODIN, GRAM, NAC,
RankFeat, AdaSCALE, ...), Mahalanobis' per-layer scores and fitting features, AdaSCALE's fitting
features, and the test-time-augmentation logits of :func:`lossbench.experiments.evaluate_run.evaluate_model`.
A fit that reduces over its loader is fed the gathered rows, so its statistics are the
single-process ones. Left whole on every rank: GRAM's and NAC's fits (a label-based selection by
position over the whole fit loader, then sums in loader order) and RankFeat's (its first batch).
An error on one rank's share is raised on every rank (the lowest failing rank's, the one a
single process meets first), so no rank waits in a collective for a rank that failed.
"""

from __future__ import annotations

import pickle
from typing import Any, Callable, Iterable, List, Optional, Tuple, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, SequentialSampler, Subset


#: Label dtypes carried over (sent as int64 or float64, given back in their own dtype); labels of another
#: dtype or not of shape (N,) are dropped (None).
LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
                torch.float64, torch.float32, torch.float16)


#: Depth of :func:`shared_pass` calls running a rank's share: a pass inside one (a score whose ``score``
#: runs :func:`ood.scores.feature_base.collect_features`, say) runs its loader, the share, whole.
_INSIDE = [0]


def world() -> Tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_share(loader: Iterable) -> Optional[DataLoader]:
    """This rank's share of ``loader`` (a loader over a contiguous run of its batches, see the module
    docstring), or ``None`` when the loader is to run whole (no process group, one rank, or a loader
    whose order cannot be split: shuffled, custom sampler, ``drop_last``, iterable data set), and inside
    a rank's share of a :func:`shared_pass`, whose loader is already this rank's alone."""
    rank, w = world()
    if _INSIDE[0] or w <= 1 or not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
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


T = TypeVar("T")


def _flatten(obj: Any, leaves: List[Any]) -> Any:
    """The structure of ``obj`` (tensors, ``None`` and other values inside tuples, lists and dicts),
    its leaves appended to ``leaves``; a tensor leaf is described by ``('t', index)``."""
    if isinstance(obj, Tensor):
        leaves.append(obj)
        return ("t", len(leaves) - 1)
    if isinstance(obj, (tuple, list)):
        return (type(obj).__name__, [_flatten(v, leaves) for v in obj])
    if isinstance(obj, dict):
        return ("dict", [(k, _flatten(v, leaves)) for k, v in obj.items()])
    return ("v", obj)


def _unflatten(spec: Any, leaves: List[Tensor]) -> Any:
    """The inverse of :func:`_flatten`, with the gathered tensor leaves."""
    kind, body = spec
    if kind == "t":
        return leaves[body]
    if kind in ("tuple", "list"):
        items = [_unflatten(v, leaves) for v in body]
        return tuple(items) if kind == "tuple" else items
    if kind == "dict":
        return {k: _unflatten(v, leaves) for k, v in body}
    return body


def _wire_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor travels in, which holds every value of ``dtype`` exactly (float64 / int64)."""
    if dtype.is_complex:
        raise TypeError(f"shared_pass gathers real tensors, got a {dtype} result")
    return torch.float64 if dtype.is_floating_point else torch.int64


def _gather_known(local: Optional[Tensor], counts: List[int], trailing: Tuple[int, ...],
                  dtype: torch.dtype) -> Tensor:
    """Row blocks of known lengths ``counts`` concatenated in rank order (padded to the longest to
    ``all_gather``), back in ``dtype`` on the CPU."""
    dev, wire = _comm_device(), _wire_dtype(dtype)
    buf = torch.zeros((max(counts), *trailing), dtype=wire, device=dev)
    if local is not None and local.shape[0]:
        buf[:local.shape[0]] = local.detach().to(dev, wire)
    parts = [torch.empty_like(buf) for _ in counts]
    dist.all_gather(parts, buf)
    return torch.cat([p[:c].cpu() for p, c in zip(parts, counts)]).to(dtype)


def _picklable(err: Exception) -> Exception:
    """``err`` itself when it can travel to the other ranks, else a ``RuntimeError`` with its text."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001 - any exception that does not survive pickling
        return RuntimeError(f"{type(err).__name__}: {err}")


def shared_pass(fn: Callable[[Iterable], T], loader: Iterable, what: str = "pass") -> T:
    """``fn(loader)`` -- a pass giving one row per sample of ``loader``, in its order -- shared out.

    Without a process group, with one rank, or for a loader that cannot be split (:func:`rank_share`)
    it is ``fn(loader)``, with no collective call. Otherwise every rank runs ``fn`` on its share
    (none on an empty share) and every rank gets the gathered result, equal to ``fn(loader)`` of one
    process: ``fn``'s result may be a tensor ``(n, ...)``, or tuples, lists and dicts of them (each
    tensor's rows concatenated in rank order, in its own dtype), with other values (``None``, an
    int) taken from the first rank with a share, the one holding the loader's first batch. When no
    rank has a share (an empty data set) every rank runs ``fn(loader)``, which then fails or returns
    exactly as one process. Every rank must call it together (a collective).
    """
    share = rank_share(loader)
    if share is None:
        return fn(loader)
    rank, w = world()
    leaves: List[Tensor] = []
    meta: Any = None  # None: no share; ('ok', spec, [(rows, trailing, dtype)]); ('error', exception)
    err: Optional[Exception] = None
    if len(share.dataset) > 0:  # type: ignore[arg-type]
        _INSIDE[0] += 1
        try:
            spec = _flatten(fn(share), leaves)
            meta = ("ok", spec, [(int(t.shape[0]) if t.dim() else -1, tuple(t.shape[1:]), t.dtype) for t in leaves])
        except Exception as e:  # noqa: BLE001 - raised on every rank below
            err = e
            meta = ("error", _picklable(e))
        finally:
            _INSIDE[0] -= 1
    metas: List[Any] = [None] * w
    dist.all_gather_object(metas, meta)
    failed = [r for r, m in enumerate(metas) if m is not None and m[0] == "error"]
    if failed:
        if err is not None and rank == failed[0]:
            raise err
        raise metas[failed[0]][1]
    known = [m for m in metas if m is not None]
    if not known:
        return fn(loader)
    _, spec, first = known[0]
    for r, m in enumerate(metas):
        if m is None:
            continue
        if [(t, d) for _, t, d in m[2]] != [(t, d) for _, t, d in first] or any(n < 0 for n, _, _ in m[2]):
            raise ValueError(f"{what}: the ranks' results differ in structure, row shape or dtype (rank {r}: "
                             f"{[(t, d) for _, t, d in m[2]]}, expected {[(t, d) for _, t, d in first]}); "
                             "a shared pass must give tensors with one row per sample")
    gathered = []
    for i, (_, trailing, dtype) in enumerate(first):
        counts = [m[2][i][0] if m is not None else 0 for m in metas]
        gathered.append(_gather_known(leaves[i] if leaves else None, counts, trailing, dtype))
    return _unflatten(spec, gathered)
