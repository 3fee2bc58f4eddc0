"""Build once (ninja, cached) and load the cut cross-entropy C++/CUDA extension.

The extension is compiled on first use with :func:`torch.utils.cpp_extension.load` into torch's
extension cache (``~/.cache/torch_extensions/...``) or into ``$LOSSBENCH_EXT_DIR/<name>`` when that
variable is set; torch re-uses the build while the sources and flags are unchanged and rebuilds
when they change (the flags carry a hash of every file in ``csrc/``). When the CUDA toolkit is
found (torch's ``CUDA_HOME`` detection: set ``CUDA_HOME`` if ``nvcc`` is not where torch looks)
the CUDA kernels are compiled in as well, for ``TORCH_CUDA_ARCH_LIST`` (default ``"8.0;9.0"``);
such a build still imports on a machine without a GPU.

If the toolchain is missing or a build fails, a single warning says so and :func:`load` returns
``None`` (callers fall back to the pure-PyTorch implementation); a failed CUDA build first falls
back to a CPU-only build. With ``LOSSBENCH_REQUIRE_EXT=1`` every failure raises instead, so a CI
job cannot silently skip the extension. ``python -m lossbench.cce.build`` builds ahead of time.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Dict, List, Optional

CSRC = Path(__file__).resolve().parent / "csrc"
CPU_SOURCES = ("cce.cpp",)
CUDA_SOURCES = ("cce_cuda.cu",)
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"

_lock = threading.Lock()
_state: Dict[str, object] = {"tried": False, "module": None, "warned": False, "errors": []}


def require_ext() -> bool:
    """Whether ``LOSSBENCH_REQUIRE_EXT=1`` asks for failures to raise instead of falling back."""
    return os.environ.get("LOSSBENCH_REQUIRE_EXT", "").strip() not in ("", "0", "false", "False")


def cuda_home() -> Optional[str]:
    """The CUDA toolkit torch would compile with, if it holds an ``nvcc``; else ``None``."""
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home is None:
        return None
    nvcc = Path(home) / "bin" / "nvcc"
    if not nvcc.exists() or not (Path(home) / "include" / "cuda_runtime.h").exists():
        return None
    return str(home)


def _sources_hash() -> str:
    digest = hashlib.sha1()
    for path in sorted(CSRC.iterdir()):
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _cpu_arch_flags() -> List[str]:
    """Vector ISA flags for this CPU (x86-64 with AVX-512 or AVX2/FMA), part of the build hash."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd", "avx2", "fma"} <= flags:
        return ["-march=x86-64-v4"]
    return ["-mavx2", "-mfma"] if {"avx2", "fma"} <= flags else []


def _build_directory(name: str) -> Optional[str]:
    root = os.environ.get("LOSSBENCH_EXT_DIR")
    if not root:
        return None  # torch's default cache
    path = Path(root).expanduser() / name
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def build(with_cuda: bool, verbose: bool = False) -> ModuleType:
    """Compile (or re-use) the extension; ``with_cuda`` adds the CUDA kernels. Raises on failure."""
    from torch.utils import cpp_extension

    name = "lossbench_cce_cuda" if with_cuda else "lossbench_cce_cpu"
    defines = [f"-DLOSSBENCH_CCE_SOURCES={_sources_hash()}"]
    cflags = ["-O3", "-fopenmp", "-fno-trapping-math", *_cpu_arch_flags(), *defines]
    sources = [str(CSRC / s) for s in CPU_SOURCES]
    kwargs = {}
    if with_cuda:
        cflags.append("-DLOSSBENCH_WITH_CUDA")
        sources += [str(CSRC / s) for s in CUDA_SOURCES]
        kwargs["extra_cuda_cflags"] = ["-O3", "-DLOSSBENCH_WITH_CUDA", *defines]
    if shutil.which("ninja") is None:
        ninja = Path(__import__("sys").executable).with_name("ninja")
        if ninja.exists():  # the venv's ninja, when the venv is not activated
            os.environ["PATH"] = f"{ninja.parent}{os.pathsep}{os.environ.get('PATH', '')}"
    old_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if with_cuda and not old_arch:
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
    try:
        return cpp_extension.load(
            name=name,
            sources=sources,
            extra_cflags=cflags,
            extra_ldflags=["-fopenmp"],
            build_directory=_build_directory(name),
            verbose=verbose,
            **kwargs,
        )
    finally:
        if with_cuda and not old_arch:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)


def _warn_once(message: str) -> None:
    if not _state["warned"]:
        _state["warned"] = True
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def load(verbose: bool = False) -> Optional[ModuleType]:
    """The compiled extension (built on first call, then cached), or ``None`` if unavailable."""
    if _state["tried"]:
        return _state["module"]  # type: ignore[return-value]
    with _lock:
        if _state["tried"]:
            return _state["module"]  # type: ignore[return-value]
        errors: List[str] = []
        module = None
        if cuda_home() is not None:
            try:
                module = build(with_cuda=True, verbose=verbose)
            except Exception as exc:  # compiler errors come as RuntimeError/OSError/...
                if require_ext():
                    _state["tried"] = True
                    raise RuntimeError(f"building the CUDA extension failed: {exc}") from exc
                errors.append(f"CUDA build failed ({type(exc).__name__}: {exc})")
        if module is None:
            try:
                module = build(with_cuda=False, verbose=verbose)
            except Exception as exc:
                errors.append(f"CPU build failed ({type(exc).__name__}: {exc})")
                if require_ext():
                    _state["tried"] = True
                    raise RuntimeError("; ".join(errors)) from exc
        _state["module"], _state["errors"], _state["tried"] = module, errors, True
        if errors:
            tail = "falling back to impl='torch'" if module is None else "using the CPU-only build"
            detail = "; ".join(e[:500] for e in errors)
            _warn_once(f"lossbench.cce extension: {detail}; {tail}")
        return module


def has_cuda_kernels() -> bool:
    """Whether the loaded extension carries the CUDA kernels."""
    module = load()
    return bool(module is not None and module.has_cuda())


def warn_fallback(reason: str) -> None:
    """Warn (once per process) that impl='ext' falls back to impl='torch', or raise if required."""
    if require_ext():
        raise RuntimeError(
            f"lossbench.cce extension required (LOSSBENCH_REQUIRE_EXT=1) but {reason}")
    _warn_once(f"lossbench.cce extension: {reason}; falling back to impl='torch'")
