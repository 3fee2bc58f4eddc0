"""Extension loader: builds once, says so once when it cannot, obeys LOSSBENCH_REQUIRE_EXT."""

from __future__ import annotations

import warnings

import pytest
import torch

from lossbench.cce import api, ext


def fresh_state(monkeypatch):
    monkeypatch.setattr(ext, "_state", {"tried": False, "module": None, "warned": False,
                                        "errors": []})


def test_builds_or_is_required(monkeypatch):
    module = ext.load()
    if ext.require_ext():
        assert module is not None
    if module is None:
        pytest.skip("extension unavailable here (allowed without LOSSBENCH_REQUIRE_EXT=1)")
    assert callable(module.run) and isinstance(module.has_cuda(), bool)
    assert ext.load() is module  # cached


def test_failed_build_warns_once_and_falls_back(monkeypatch):
    fresh_state(monkeypatch)
    monkeypatch.delenv("LOSSBENCH_REQUIRE_EXT", raising=False)

    def broken(with_cuda, verbose=False):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(ext, "build", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert api.resolve_impl("auto", torch.device("cpu")) == "torch"
        assert api.resolve_impl("ext", torch.device("cpu")) == "torch"
        E, C = torch.randn(3, 2), torch.randn(4, 2)
        api.linear_cross_entropy(E, C, torch.tensor([0, 1, 3]), impl="ext")
    msgs = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "no compiler" in str(msgs[0].message)


def test_required_extension_raises(monkeypatch):
    fresh_state(monkeypatch)
    monkeypatch.setenv("LOSSBENCH_REQUIRE_EXT", "1")

    def broken(with_cuda, verbose=False):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(ext, "build", broken)
    with pytest.raises(RuntimeError, match="no compiler"):
        api.resolve_impl("auto", torch.device("cpu"))


def test_cuda_tensors_need_cuda_kernels(monkeypatch):
    class CpuOnly:
        @staticmethod
        def has_cuda():
            return False

    fresh_state(monkeypatch)
    monkeypatch.delenv("LOSSBENCH_REQUIRE_EXT", raising=False)
    monkeypatch.setattr(ext, "load", lambda verbose=False: CpuOnly())
    with pytest.warns(RuntimeWarning, match="without CUDA"):
        assert api.resolve_impl("auto", torch.device("cuda")) == "torch"
