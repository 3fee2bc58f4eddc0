"""The interface every OOD score shares, and the helpers that run a model over a loader.

Convention, everywhere in :mod:`ood`: **a higher score means more in-distribution**.

A score is fitted on in-distribution training data (``fit(model, loader)``, a no-op for scores
that need nothing) and then returns one ``float64`` number per sample (``score(model, loader)``).
Loaders yield ``(x, y)`` batches. The model protocol (duck-typed): ``model(x) -> logits (N, C)``;
``model.features(x) -> (N, D)`` penultimate features (or a plain timm classifier, whose
``forward_features``/``forward_head(pre_logits=True)`` are used); ``model.backbone`` a timm model
(multi-layer features); ``model.head.logits(features)`` a lossbench head.
"""

from __future__ import annotations

import abc
import math
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from lossbench.validation import check_finite, check_float, check_not_meta


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameter-free model)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode inside the block and restore its previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def batches(loader: Iterable, device: torch.device) -> Iterator[Tuple[Tensor, Any]]:
    """``(x, y)`` from each batch of ``loader`` with ``x`` on ``device``; clear error otherwise.

    A ``meta`` or non-finite (NaN/inf) ``x`` is a ``ValueError`` naming the batch, rather than
    an error about the logits or features it would produce.
    """
    for i, batch in enumerate(loader):
        if not isinstance(batch, (tuple, list)) or len(batch) < 1:
            raise TypeError(f"loader must yield (x, y) batches; batch {i} is {type(batch).__name__}")
        x = batch[0]
        if not isinstance(x, Tensor):
            raise TypeError(f"loader batch {i}: x must be a torch.Tensor, got {type(x).__name__}")
        check_not_meta(x, f"loader batch {i}: x")
        if x.is_floating_point():
            check_finite(x, f"loader batch {i}: x")
        y = batch[1] if len(batch) > 1 else None
        yield x.to(device), y


def check_logits(logits: Tensor, name: str = "logits") -> None:
    """Logits must be a finite float ``(N, C)`` tensor with ``C >= 1``."""
    check_float(logits, name, ndim=2)
    if logits.shape[1] < 1:
        raise ValueError(f"{name} must have at least one class column, got shape {tuple(logits.shape)}")
    check_finite(logits, name)


def concat_scores(parts: List[Tensor], what: str) -> Tensor:
    """Concatenate per-batch scores to ``(N,)`` float64 on the CPU; an empty loader is an error."""
    if not parts:
        raise ValueError(f"{what}: the loader yielded no samples; expected a non-empty data set")
    return torch.cat([p.detach().to("cpu", torch.float64) for p in parts])


#: What a score needs to run: ``'logits'`` (a function of the logits alone: one shared forward pass
#: serves every such score), ``'features'`` (penultimate features and logits, see
#: :mod:`ood.scores.feature_base`: the same shared pass) or ``'model'`` (it runs the model itself,
#: e.g. through the input gradient).
NEEDS = ("logits", "features", "model")


def public_override(cls: type, base: type, public: str, private: str) -> None:
    """Let a subclass ``cls`` of ``base`` define its formula under the documented, public name.

    The checks live in ``base.<public>`` (input shapes, float64, finiteness), which calls the
    formula ``<private>``. A class that defines ``<public>`` but not ``<private>`` has its method
    moved to ``<private>`` and gets ``base``'s checked ``<public>`` back, so ``score_logits`` in a
    user's class is the formula and its inputs are still checked.
    """
    own = cls.__dict__.get(public)
    if own is None or private in cls.__dict__ or own is getattr(base, public):
        return
    setattr(cls, private, own)
    setattr(cls, public, getattr(base, public))


def source_identity(source: Any) -> Tuple[Any, ...]:
    """What :meth:`OODScore.memoised` knows a source by: a tensor by its storage, view and version
    counter (so a detached view of the same data is the same source, and an in-place change is not),
    anything else by its ``id``."""
    if isinstance(source, Tensor):
        return ("tensor", source.untyped_storage().data_ptr(), source.storage_offset(), tuple(source.shape),
                tuple(source.stride()), source.dtype, str(source.device), source._version)
    return ("object", id(source))


class OODScore(abc.ABC):
    """Base class of every OOD score: ``fit`` then ``score``; higher = more in-distribution.

    The evaluator (:func:`ood.evaluate_ood`) only uses this interface: ``fit``, ``evaluate``
    (ID and OOD scores per OOD set; a score with its own protocol overrides it), ``info`` (the
    settings to report) and ``needs``.
    """

    name: str = ""
    needs: str = "model"
    #: A dict one evaluation shares between its scores and their grid points (:func:`ood.evaluate_ood`:
    #: same model, same loaders, nothing trained in between). A score whose model passes do not depend
    #: on the parameters searched keeps them there (:meth:`memoised`) instead of recomputing them at
    #: every point (NAC: 256 points, one forward and backward pass each). ``None``: nothing is kept.
    pass_memo: Optional[Dict[Any, Any]] = None

    def memoised(self, key: Any, source: Any, compute: Callable[[], Any]) -> Any:
        """``compute()``, or what it gave for ``key`` and this very ``source`` (a loader, or a tensor of
        the evaluation's shared pass) earlier in :attr:`pass_memo`.

        ``key`` must name everything the result depends on besides the model and the source (the score
        family and its settings); the source object itself is kept, so that its id is not reused."""
        memo = self.pass_memo
        ident = source_identity(source)
        hit = memo.get((key, ident)) if memo is not None else None
        if hit is not None:
            return hit[1]
        value = compute()
        if memo is not None:
            memo[(key, ident)] = (source, value)  # the source is kept: its id / storage is not reused
        return value

    def fit(self, model: nn.Module, loader: Iterable, val_loader: Optional[Iterable] = None) -> "OODScore":
        """Fit on in-distribution training data ``loader`` (no-op by default); returns ``self``.

        ``val_loader`` (in-distribution validation data) is for scores whose protocol tunes on it;
        the others ignore it.
        """
        return self

    @abc.abstractmethod
    def score(self, model: nn.Module, loader: Iterable) -> Tensor:
        """``(N,)`` float64 scores of every sample of ``loader``; higher = more in-distribution."""

    def evaluate(self, model: nn.Module, id_loader: Iterable,
                 ood_loaders: Mapping[str, Iterable]) -> Dict[str, Tuple[Tensor, Tensor]]:
        """``{ood_set: (id_scores, ood_scores)}``: the ID test set scored once, each OOD set once.

        Under ``torchrun`` each loader's pass is shared out over the ranks and gathered
        (:func:`ood.distributed.shared_pass`; every rank must call this together), with the
        single-process scores on every rank."""
        s_in = self.score_pass(model, id_loader)
        return {name: (s_in, self.score_pass(model, loader)) for name, loader in ood_loaders.items()}

    def score_pass(self, model: nn.Module, loader: Iterable) -> Tensor:
        """:meth:`score` of ``loader``, shared out over the ranks of a process group when there is one
        (:func:`ood.distributed.shared_pass`; the scores are per sample, so they equal one process's)."""
        from ..distributed import shared_pass

        return shared_pass(lambda part: self.score(model, part), loader, f"{self.name or type(self).__name__} score")

    def result_note(self) -> Optional[str]:
        """A remark the evaluator attaches to every metrics entry of this score (``None``: none)."""
        return None

    def info(self) -> Dict[str, Any]:
        """The hyper-parameters (and fitted settings, where a score has them) to report."""
        return self._params()

    def _params(self) -> Dict[str, Any]:
        """The instance's settings: its attributes, less fitted state (``name_``) and :attr:`pass_memo`."""
        return {k: v for k, v in vars(self).items() if not k.endswith("_") and k != "pass_memo"}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}({params})"


class LogitScore(OODScore):
    """A score that is a function of the logits alone (MSP, energy, max-logit).

    ``score_logits(logits)`` is the tensor-level twin; ``score_head(head, features)`` scores a
    lossbench head through its own logits; ``score(model, loader)`` runs ``model(x)`` once per
    batch without gradients. ``needs = 'logits'``: the evaluator may pass it logits it computed
    once for every such score (a subclass that overrides ``score`` sets ``needs = 'model'``).
    """

    needs = "logits"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        public_override(cls, LogitScore, "score_logits", "_score_logits")

    @abc.abstractmethod
    def _score_logits(self, logits: Tensor) -> Tensor:
        """The formula on checked logits ``(N, C)``; returns ``(N,)``. A subclass may define it under
        the public name ``score_logits`` instead (see :func:`public_override`)."""

    def score_logits(self, logits: Tensor) -> Tensor:
        """``(N,)`` scores from logits ``(N, C)``, computed in float64 (higher = in-distribution)."""
        check_logits(logits)
        return self._score_logits(logits.double())

    def score_head(self, head: nn.Module, features: Tensor) -> Tensor:
        """Scores of features ``(N, D)`` through a lossbench head's ``logits`` (no noise)."""
        with torch.no_grad():
            return self.score_logits(head.logits(features))

    def score(self, model: nn.Module, loader: Iterable) -> Tensor:
        parts = []
        with eval_mode(model), torch.no_grad():
            for x, _ in batches(loader, model_device(model)):
                parts.append(self.score_logits(model(x)))
        return concat_scores(parts, f"{self.name} score")


def gradient_sign(grad: Tensor) -> Tensor:
    """``+1`` where ``grad >= 0`` else ``-1`` (the official ODIN / Mahalanobis codes' ``ge(grad, 0)``)."""
    return torch.where(grad >= 0, 1.0, -1.0).to(grad.dtype)


def input_step(x: Tensor, direction: Tensor, eps: float, input_std=None) -> Tensor:
    """``x + eps * direction / std``: a step of ``eps`` in un-normalised pixel units.

    ``input_std`` (per-channel, for ``(N, C, ...)`` inputs) is the std of the model's input
    normalisation, as the official ODIN and Mahalanobis codes divide the step by it; ``None``
    takes the step directly in the model's input space.
    """
    if input_std is not None:
        std = torch.as_tensor(input_std, dtype=x.dtype, device=x.device)
        if std.dim() != 1 or x.dim() < 2 or std.numel() != x.shape[1]:
            raise ValueError(
                f"input_std must hold one value per input channel ({x.shape[1] if x.dim() > 1 else '?'}),"
                f" got {tuple(std.shape)}"
            )
        direction = direction / std.view(1, -1, *([1] * (x.dim() - 2)))
    return x + eps * direction


def check_input_std(input_std) -> None:
    """``input_std`` is ``None`` or a non-empty sequence of finite floats > 0 (NaN and inf refused)."""
    if input_std is not None:
        vals = [float(v) for v in input_std]
        if not vals or not all(math.isfinite(v) and v > 0 for v in vals):
            raise ValueError(f"input_std must be a non-empty sequence of finite floats > 0, got {input_std!r}")
