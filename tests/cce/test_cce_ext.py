"""Extension loader: builds once, says so once when it cannot, obeys LOSSBENCH_REQUIRE_EXT."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

from lossbench.cce import api, dispatch, ext
from lossbench.cce import autograd as cce_autograd


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

    def broken(with_cuda, verbose=False, why=""):
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

    def broken(with_cuda, verbose=False, why=""):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(ext, "build", broken)
    with pytest.raises(RuntimeError, match="no compiler"):
        api.resolve_impl("auto", torch.device("cpu"))


class _WithCudaKernels:
    @staticmethod
    def has_cuda() -> bool:
        return True


class _CpuOnly:
    @staticmethod
    def has_cuda() -> bool:
        return False


def test_cuda_tensors_need_cuda_kernels(monkeypatch):
    fresh_state(monkeypatch)
    monkeypatch.delenv("LOSSBENCH_REQUIRE_EXT", raising=False)
    monkeypatch.setattr(ext, "load", lambda verbose=False: _CpuOnly())
    with pytest.warns(RuntimeWarning, match="without CUDA"):
        assert api.resolve_impl("ext", torch.device("cuda")) == "torch"


# ---- which kernels are built, and the line that says so -----------------------------------------
class FakeModule:
    def __init__(self, cuda):
        self.cuda = cuda

    def has_cuda(self):
        return self.cuda


@pytest.mark.parametrize("env, gpu, expected", [
    (None, False, False), (None, True, True), ("1", False, True), ("0", True, False), ("", True, True),
])
def test_cuda_kernels_only_where_a_gpu_is_or_asked_for(monkeypatch, env, gpu, expected):
    """The builder is mocked: which build ``load`` asks for, never a real nvcc run."""
    fresh_state(monkeypatch)
    monkeypatch.delenv("LOSSBENCH_REQUIRE_EXT", raising=False)
    if env is None:
        monkeypatch.delenv(ext.BUILD_CUDA_ENV, raising=False)
    else:
        monkeypatch.setenv(ext.BUILD_CUDA_ENV, env)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(ext, "cuda_home", lambda: "/opt/fake-cuda")  # a toolkit is there
    calls = []

    def fake_build(with_cuda, verbose=False, why=""):
        calls.append((with_cuda, why))
        return FakeModule(with_cuda)

    monkeypatch.setattr(ext, "build", fake_build)
    assert ext.load().has_cuda() is expected
    assert [c[0] for c in calls] == [expected] and calls[0][1]  # one build, with its reason


def test_asked_for_cuda_without_a_toolkit(monkeypatch):
    fresh_state(monkeypatch)
    monkeypatch.setenv(ext.BUILD_CUDA_ENV, "1")
    monkeypatch.setattr(ext, "cuda_home", lambda: None)
    monkeypatch.setattr(ext, "build", lambda with_cuda, verbose=False, why="": FakeModule(with_cuda))
    monkeypatch.setenv("LOSSBENCH_REQUIRE_EXT", "1")
    with pytest.raises(RuntimeError, match="LOSSBENCH_BUILD_CUDA=1 asks for the CUDA kernels but no CUDA toolkit"):
        ext.load()
    fresh_state(monkeypatch)
    monkeypatch.delenv("LOSSBENCH_REQUIRE_EXT")
    with pytest.warns(RuntimeWarning, match="no CUDA toolkit"):
        assert ext.load().has_cuda() is False  # the CPU build, with a warning
    monkeypatch.setenv(ext.BUILD_CUDA_ENV, "maybe")
    with pytest.raises(ValueError, match="LOSSBENCH_BUILD_CUDA must be 1 or 0"):
        ext.want_cuda()


@pytest.mark.parametrize("with_cuda", [False, True])
def test_a_compile_is_announced_once_on_stderr(monkeypatch, tmp_path, capsys, with_cuda):
    """``cpp_extension.load`` is mocked: the flags it gets, and the line before a compile (not after)."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("LOSSBENCH_EXT_DIR", str(tmp_path))
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    loads = []

    def fake_load(name, sources, extra_cflags, extra_ldflags, build_directory, verbose, **kw):
        loads.append(dict(name=name, sources=sources, cflags=extra_cflags, arch=os.environ.get("TORCH_CUDA_ARCH_LIST"), **kw))
        (Path(build_directory) / f"{name}.so").write_bytes(b"")
        return FakeModule(with_cuda)

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    ext.build(with_cuda=with_cuda, why="a GPU is present" if with_cuda else "no GPU here")
    name = "lossbench_cce_cuda" if with_cuda else "lossbench_cce_cpu"
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("lossbench:")]  # not torch's own
    assert len(lines) == 1 and lines[0].startswith("lossbench: building the cut cross-entropy C++ extension (")
    err = lines[0]
    assert err.endswith(f"first use only, cached in {tmp_path / name})")
    if with_cuda:
        assert "CPU and CUDA kernels, CUDA for TORCH_CUDA_ARCH_LIST=8.0;9.0 because a GPU is present" in err
        assert any(s.endswith("cce_cuda.cu") for s in loads[0]["sources"])
        assert "-DLOSSBENCH_WITH_CUDA" in loads[0]["cflags"] and "-DLOSSBENCH_WITH_CUDA" in loads[0]["extra_cuda_cflags"]
        assert loads[0]["arch"] == ext.DEFAULT_CUDA_ARCH_LIST
    else:
        assert "(CPU kernels; no CUDA kernels: no GPU here;" in err
        assert not any(s.endswith(".cu") for s in loads[0]["sources"]) and "extra_cuda_cflags" not in loads[0]
        assert "-DLOSSBENCH_WITH_CUDA" not in loads[0]["cflags"]
    ext.build(with_cuda=with_cuda)  # cached: torch re-uses it, nothing to say
    assert "lossbench:" not in capsys.readouterr().err and len(loads) == 2


@pytest.mark.parametrize("argv, toolkit, gpu, expected", [
    (["--cuda"], True, False, (True, 0)),
    ([], True, False, (False, 0)),
    ([], True, True, (True, 0)),
    (["--cpu-only"], True, True, (False, 0)),
    (["--cuda"], False, False, (None, 1)),
])
def test_build_command_passes_the_cuda_choice(monkeypatch, capsys, argv, toolkit, gpu, expected):
    from lossbench.cce import build as build_cli

    monkeypatch.delenv(ext.BUILD_CUDA_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(ext, "cuda_home", lambda: "/opt/fake-cuda" if toolkit else None)
    calls = []

    class Built(FakeModule):
        __name__, __file__ = "lossbench_cce_x", "/tmp/lossbench_cce_x.so"

    def fake_build(with_cuda, verbose=False, why=""):
        calls.append(with_cuda)
        return Built(with_cuda)

    monkeypatch.setattr(ext, "build", fake_build)
    assert build_cli.main(argv) == expected[1]
    assert calls == ([] if expected[0] is None else [expected[0]])


def test_make_test_compiles_the_cuda_kernels_and_test_fast_does_not():
    """CI (``.ci/run``: ``make test``) keeps checking that the CUDA kernels compile; ``make test-fast`` does not."""
    text = (Path(__file__).resolve().parents[2] / "Makefile").read_text()

    def rule(target):
        head, _, rest = text.partition(f"\n{target}:")
        deps, *recipe = rest.split("\n")
        return deps.split(), [l.strip() for l in recipe[: next(i for i, l in enumerate(recipe) if not l.startswith("\t"))]]

    deps, recipe = rule("test")
    assert "ext-cuda" in deps and any("LOSSBENCH_BUILD_CUDA=$(if $(CUDA_HOME),1,0)" in l for l in recipe)
    assert any("lossbench.cce.build $(if $(CUDA_HOME),--cuda,--cpu-only)" in l for l in rule("ext-cuda")[1])
    deps, recipe = rule("test-fast")
    assert "ext-cpu" in deps and "ext-cuda" not in deps and any("LOSSBENCH_BUILD_CUDA=0" in l for l in recipe)
    assert any("lossbench.cce.build --cpu-only" in l for l in rule("ext-cpu")[1])


@pytest.mark.slow
def test_real_cpu_build_says_so_once(tmp_path):
    """A real CPU-only build in a fresh cache folder: the line on stderr, then silence once cached."""
    import subprocess
    import sys

    env = dict(os.environ, LOSSBENCH_EXT_DIR=str(tmp_path), LOSSBENCH_BUILD_CUDA="0")
    run = lambda: subprocess.run([sys.executable, "-m", "lossbench.cce.build"], env=env, capture_output=True,
                                 text=True, timeout=900, cwd=Path(__file__).resolve().parents[2])
    first = run()
    assert first.returncode == 0, first.stderr
    assert "lossbench: building the cut cross-entropy C++ extension (CPU kernels" in first.stderr
    assert str(tmp_path / "lossbench_cce_cpu") in first.stderr and "CUDA kernels: no" in first.stdout
    second = run()
    assert second.returncode == 0 and "building the cut cross-entropy" not in second.stderr



@pytest.mark.parametrize("device_type, capability, expected", [
    ("cpu", None, True), ("cuda", (9, 0), True), ("cuda", (8, 0), False), ("cuda", (12, 0), False),
    ("cuda", None, False), ("mps", None, False), ("meta", None, False)])
def test_auto_uses_the_extension_only_where_verified(monkeypatch, device_type, capability, expected):
    monkeypatch.setattr(dispatch, "cuda_capability", lambda device: capability)
    assert dispatch.auto_uses_ext(torch.device(device_type)) is expected


def test_verified_capabilities_are_the_ones_the_gpu_tests_passed_on():
    assert dispatch.VERIFIED_CUDA_CAPABILITIES == ((9, 0),)  # H200: bench/gpu.sh, tests/cce -k cuda


def test_auto_on_an_unverified_gpu_uses_torch_even_with_cuda_kernels(monkeypatch):
    """Regression: 'auto' picked never-run CUDA kernels whenever they were compiled in; now a GPU
    whose capability has not passed the CUDA tests stays on the pure-PyTorch pass unless impl='ext'."""
    fresh_state(monkeypatch)
    monkeypatch.setenv("LOSSBENCH_REQUIRE_EXT", "1")  # a silent fallback would raise
    loads = []
    monkeypatch.setattr(ext, "load", lambda verbose=False: loads.append(1) or _WithCudaKernels())
    monkeypatch.setattr(dispatch, "cuda_capability", lambda device: (8, 6))
    cuda = torch.device("cuda")
    assert api.resolve_impl("auto", cuda) == "torch"
    assert api.resolve_impl("auto", torch.device("cuda", 1)) == "torch"
    assert not loads  # 'auto' on such a GPU does not even build or load the extension
    assert api.resolve_impl("ext", cuda) == "ext"
    assert api.resolve_impl("auto", torch.device("cpu")) == "ext"
    # a verified capability: 'auto' takes the kernels
    monkeypatch.setattr(dispatch, "cuda_capability", lambda device: (9, 0))
    assert api.resolve_impl("auto", cuda) == "ext"


def test_auto_on_cuda_reaches_the_torch_pass(monkeypatch):
    """The choice made for a (simulated) CUDA tensor of an unverified GPU is what the autograd function runs."""
    monkeypatch.setattr(ext, "load", lambda verbose=False: _WithCudaKernels())
    monkeypatch.setattr(dispatch, "cuda_capability", lambda device: (8, 6))
    real = api.resolve_impl
    monkeypatch.setattr(api, "resolve_impl",
                        lambda impl, device: real(impl, torch.device("cuda")))
    ran = []
    real_run = cce_autograd._run
    monkeypatch.setattr(cce_autograd, "_run", lambda impl, *a: ran.append(impl) or real_run(impl, *a))
    E = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    C = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 6, 2, 3, 1])
    loss = api.linear_cross_entropy(E, C, t)
    loss.backward()
    ref = torch.nn.functional.cross_entropy(E.detach() @ C.detach().t(), t)
    assert ran == ["torch"] and torch.allclose(loss.detach(), ref)


def test_sort_vocab_default_is_on_for_the_cpu_and_off_on_cuda(monkeypatch):
    """Sorting the vocabulary was measured slower on an H200 (docs/cce.md); the CPU keeps it."""
    from lossbench.cce import autograd as cce_autograd
    from lossbench.cce import linear_cross_entropy

    assert dispatch.sort_vocab_default(torch.device("cpu"))
    assert not dispatch.sort_vocab_default(torch.device("cuda"))
    calls = []
    real = cce_autograd._mean_logit_order
    monkeypatch.setattr(cce_autograd, "_mean_logit_order",
                        lambda *a: calls.append(1) or real(*a))
    gen = torch.Generator().manual_seed(0)
    E = torch.randn(8, 4, generator=gen, requires_grad=True)
    C = torch.randn(600, 4, generator=gen, requires_grad=True)
    t = torch.randint(0, 600, (8,), generator=gen)

    def run(**kw):
        calls.clear()
        linear_cross_entropy(E, C, t, impl="torch", chunk_size=256, **kw).backward()
        return len(calls)

    assert run() == 1 and run(sort_vocab=False) == 0 and run(filter_eps=None) == 0
    # a device type outside SORT_VOCAB_BY_DEFAULT (as CUDA is) does not sort unless asked to
    monkeypatch.setattr(dispatch, "SORT_VOCAB_BY_DEFAULT", ())
    assert run() == 0 and run(sort_vocab=True) == 1
