"""Any classifier as (penultimate features -> final linear layer), so every score runs on it.

The scores need two things of a model: its penultimate features ``h`` and the linear layer ``z = W h + b``
that turns them into logits. lossbench models and timm classifiers expose both; for anything else,
:func:`adapt_classifier` finds them in the model's traced graph
(``torchvision.models.feature_extraction.create_feature_extractor``, torch.fx): the node that produces
the model's output must be an ``nn.Linear`` module call, and its input is the penultimate layer. This
covers torchvision's ResNet, MobileNet, EfficientNet, ConvNeXt, ViT, Swin, DenseNet and VGG families and
an ``nn.Sequential`` ending in a linear layer (tested). Anything else is an error naming the operation
that produces the output, never a guess; pass ``features=`` and ``head=`` callables instead.

>>> model = ood.adapt_classifier(torchvision.models.resnet18(num_classes=10))
>>> h = model.features(x); logits = model(x)        # logits == the original model's output
"""

from __future__ import annotations

import weakref
from typing import Callable, Optional

import torch.nn as nn
from torch import Tensor

__all__ = ["AdaptedClassifier", "adapt_classifier", "as_adapted", "has_feature_interface"]


def has_feature_interface(model: nn.Module) -> bool:
    """Whether the scores can already use ``model``: ``features(x)``, or a timm classifier's
    ``forward_features`` / ``forward_head``."""
    return callable(getattr(model, "features", None)) and not isinstance(getattr(model, "features"), nn.Module) or (
        hasattr(model, "forward_features") and hasattr(model, "forward_head"))


class AdaptError(TypeError, ValueError):
    """A model whose penultimate features / final linear layer cannot be found (pass features= and head=)."""


class AdaptedClassifier(nn.Module):
    """``model`` seen as ``head(features(x))``: ``features(x)`` -> ``(N, D)``, ``forward(x)`` -> logits,
    ``head`` / ``get_classifier()`` -> the final layer (an ``nn.Linear`` when found by tracing).

    ``source`` says how the two were found (for error messages and reports); ``traced``: found in the
    traced graph, so ``model(x)`` itself calls ``head`` on the features (:mod:`ood.stages` hooks it).
    """

    def __init__(self, model: nn.Module, features: Callable[[Tensor], Tensor], head: Callable[[Tensor], Tensor],
                 source: str, traced: bool = False):
        super().__init__()
        self.model = model
        self._features = features
        self.head = head if isinstance(head, nn.Module) else _CallableHead(head)
        self.source = source
        self.traced = bool(traced)

    def features(self, x: Tensor) -> Tensor:
        h = self._features(x)
        if not isinstance(h, Tensor) or h.dim() != 2:
            raise ValueError(f"features ({self.source}) must return (N, D) tensors, got "
                             f"{tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__}")
        return h

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def get_classifier(self) -> nn.Module:
        return self.head


class _CallableHead(nn.Module):
    def __init__(self, fn: Callable[[Tensor], Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, h: Tensor) -> Tensor:
        return self.fn(h)


def adapt_classifier(model: nn.Module, features: Optional[Callable[[Tensor], Tensor]] = None,
                     head: Optional[Callable[[Tensor], Tensor]] = None) -> nn.Module:
    """``model`` ready for every score (see the module docstring).

    - ``features`` and ``head`` given: used as they are (``head(features(x))`` must be the logits);
    - a model with the feature interface already (lossbench ``Classifier``, timm classifiers): returned
      unchanged;
    - otherwise the traced graph gives the input of the final ``nn.Linear`` as the features.
    """
    if (features is None) != (head is None):
        raise ValueError("pass both features= and head= (callables), or neither")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if features is not None:
        if not callable(features) or not callable(head):
            raise TypeError("features and head must be callables (x -> (N, D) features, features -> logits)")
        return AdaptedClassifier(model, features, head, "user-given features / head")
    if isinstance(model, AdaptedClassifier) or has_feature_interface(model):
        return model
    return _traced(model)


def _traced(model: nn.Module) -> AdaptedClassifier:
    try:
        from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    except ImportError as err:  # pragma: no cover - torchvision is a dependency of the framework only
        raise ImportError("adapting a model without features(x) needs torchvision's feature extraction "
                          "(pip install torchvision), or pass features= and head=") from err
    was_training = model.training
    try:
        train_nodes, eval_nodes = get_graph_node_names(model)
    except Exception as err:  # tracing fails on data-dependent control flow
        raise AdaptError(f"{type(model).__name__} could not be traced to find its penultimate layer "
                         f"({type(err).__name__}: {err}); pass features= and head= callables") from None
    finally:
        model.train(was_training)
    # torchvision's extractor holds one graph per mode and swaps them on .train()/.eval(): both are
    # rewritten to return the final linear layer's input, so the adapter works whichever mode the model
    # was in when adapted (a model adapted in training mode is then evaluated in eval mode).
    gm = create_feature_extractor(model, train_return_nodes={train_nodes[-1]: "out"},
                                  eval_return_nodes={eval_nodes[-1]: "out"})
    modules = dict(model.named_modules())
    linear_name = _rewrite_output(gm.eval_graph, model, modules)  # what scoring uses: must be a linear layer
    try:
        _rewrite_output(gm.train_graph, model, modules, expect=linear_name)
    except AdaptError:  # e.g. auxiliary outputs in training mode only: features() says so in that mode
        pass
    gm.recompile()  # the current mode's graph; the other is compiled when .train()/.eval() swaps it in
    fx = gm

    def features(x: Tensor) -> Tensor:
        fx.train(model.training)
        out = fx(x)
        if not isinstance(out, dict) or "features" not in out:
            raise AdaptError(f"{type(model).__name__} in training mode does not end in its final linear layer "
                             f"{linear_name!r}; put it in eval mode (model.eval()) to take its features")
        return out["features"]

    adapted = AdaptedClassifier(model, features, modules[linear_name],
                                f"{type(model).__name__}: input of its final linear layer {linear_name!r}", traced=True)
    adapted.add_module("_extractor", fx)
    return adapted


def _rewrite_output(graph, model: nn.Module, modules: dict, expect: Optional[str] = None) -> str:
    """Make ``graph`` (one mode's graph of the extractor) return ``{'features': input of the final
    linear layer}``; the name of that layer, or :class:`AdaptError` (graph unchanged) when the output
    is not an ``nn.Linear`` call (or not layer ``expect``)."""
    out_node = next(n for n in graph.nodes if n.op == "output")
    value = out_node.args[0]
    producer = value["out"] if isinstance(value, dict) else value
    if expect is not None and (producer.op != "call_module" or str(producer.target) != expect):
        raise AdaptError(f"the training-mode graph does not end in {expect!r}")
    if producer.op != "call_module" or not isinstance(modules.get(str(producer.target)), nn.Linear):
        what = f"{producer.op} {producer.target}"
        if producer.op == "call_module":
            what += f" ({type(modules.get(str(producer.target))).__name__})"
        raise AdaptError(f"{type(model).__name__}'s output is produced by {what}, not by an nn.Linear layer; "
                         "pass features= (x -> penultimate features) and head= (features -> logits)")
    out_node.args = ({"features": producer.args[0]},)
    graph.eliminate_dead_code()
    return str(producer.target)


_ADAPTED: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()


def as_adapted(model: nn.Module) -> nn.Module:
    """``model`` itself when it has the feature interface, else its (cached) :func:`adapt_classifier` view."""
    if isinstance(model, AdaptedClassifier) or has_feature_interface(model):
        return model
    adapted = _ADAPTED.get(model)
    if adapted is None:
        adapted = _ADAPTED[model] = adapt_classifier(model)
    return adapted
