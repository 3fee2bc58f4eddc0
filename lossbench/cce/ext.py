"""Build once (ninja, cached) and load the cut cross-entropy C++/CUDA extension.

The extension is compiled on first use with :func:`torch.utils.cpp_extension.load` into torch's
extension cache (``~/.cache/torch_extensions/...``) or into ``$LOSSBENCH_EXT_DIR/<name>`` when that
variable is set; torch re-uses the build while the sources and flags are unchanged and rebuilds
when they change (the flags carry a hash of every file in ``csrc/``). Whenever a build is about to
compile (none is cached for these sources and flags), one line on stderr says what is built, why
and where it is cached.

The CUDA kernels (minutes of ``nvcc``) are compiled in only where they can run or are asked for
(:func:`want_cuda`): ``LOSSBENCH_BUILD_CUDA=1`` asks for them, ``=0`` leaves them out, unset means
"when ``torch.cuda.is_available()``". They need the CUDA toolkit (torch's ``CUDA_HOME`` detection:
set ``CUDA_HOME`` if ``nvcc`` is not where torch looks) and are built for ``TORCH_CUDA_ARCH_LIST``
(default ``"8.0;9.0"``); such a build still imports on a machine without a GPU, which is how CI
checks that they compile (``make test``).

If the toolchain is missing or a build fails, a single warning says so and :func:`load` returns
``None`` (callers fall back to the pure-PyTorch implementation); a failed CUDA build first falls
back to a CPU-only build. With ``LOSSBENCH_REQUIRE_EXT=1`` every failure raises instead, so a CI
job cannot silently skip the extension. ``python -m lossbench.cce.build`` builds ahead of time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Dict, List, Optional, Tuple

CSRC = Path(__file__).resolve().parent / "csrc"
CPU_SOURCES = ("cce.cpp",)
CUDA_SOURCES = ("cce_cuda.cu",)
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"
#: Environment variable that asks for (1) or leaves out (0) the CUDA kernels; unset: when a GPU is present.
BUILD_CUDA_ENV = "LOSSBENCH_BUILD_CUDA"
#: File in the build directory naming the build it holds (to tell a cached build from one to compile).
STAMP = ".lossbench-build-key"

_lock = threading.Lock()
_state: Dict[str, object] = {"tried": False, "module": None, "warned": False, "errors": []}


def require_ext() -> bool:
    """Whether ``LOSSBENCH_REQUIRE_EXT=1`` asks for failures to raise instead of falling back."""
    return os.environ.get("LOSSBENCH_REQUIRE_EXT", "").strip() not in ("", "0", "false", "False")


def cuda_requested() -> Optional[bool]:
    """``LOSSBENCH_BUILD_CUDA``: ``True`` for 1/true/yes, ``False`` for 0/false/no, ``None`` when unset or empty."""
    value = os.environ.get(BUILD_CUDA_ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{BUILD_CUDA_ENV} must be 1 or 0 (or unset: CUDA kernels when a GPU is present), "
                     f"got {os.environ[BUILD_CUDA_ENV]!r}")


def want_cuda() -> Tuple[bool, str]:
    """Whether to compile the CUDA kernels, and why: ``LOSSBENCH_BUILD_CUDA`` if set, else whether
    ``torch.cuda.is_available()`` (no GPU: no minutes of ``nvcc`` for kernels that cannot run here)."""
    asked = cuda_requested()
    if asked is not None:
        return asked, f"{BUILD_CUDA_ENV}={os.environ[BUILD_CUDA_ENV].strip()}"
    import torch

    if torch.cuda.is_available():
        return True, "a GPU is present"
    return False, f"no GPU here; {BUILD_CUDA_ENV}=1 adds them"


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


def build_directory(name: str) -> str:
    """Where extension ``name`` is built and cached: ``$LOSSBENCH_EXT_DIR/<name>`` or torch's cache."""
    path = _build_directory(name)
    if path is not None:
        return path
    from torch.utils import cpp_extension

    return cpp_extension._get_build_directory(name, verbose=False)


def _build_key(name: str, sources: List[str], cflags: List[str], cuda_cflags: List[str]) -> str:
    import torch

    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if cuda_cflags else ""
    text = json.dumps([name, sources, cflags, cuda_cflags, arch, torch.__version__, sys.version])
    return hashlib.sha1(text.encode()).hexdigest()


def _is_cached(directory: str, name: str, key: str) -> bool:
    """Whether ``directory`` holds the build of ``key`` (its stamp, written after it, and the library)."""
    try:
        stamp = (Path(directory) / STAMP).read_text().strip()
    except OSError:
        return False
    return stamp == key and any(Path(directory).glob(f"{name}*.so"))


def announce(with_cuda: bool, why: str, directory: str) -> None:
    """The one stderr line before a compile: what is built, why, where it is cached."""
    if with_cuda:
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCH_LIST
        what = (f"CPU and CUDA kernels, CUDA for TORCH_CUDA_ARCH_LIST={arch} because {why}; "
                f"the CUDA part takes minutes")
    else:
        what = f"CPU kernels{'; no CUDA kernels: ' + why if why else ''}"
    print(f"lossbench: building the cut cross-entropy C++ extension ({what}; first use only, "
          f"cached in {directory})", file=sys.stderr, flush=True)


def build(with_cuda: bool, verbose: bool = False, why: str = "") -> ModuleType:
    """Compile (or re-use) the extension; ``with_cuda`` adds the CUDA kernels. Raises on failure.

    ``why`` says why the CUDA kernels are in or out, for the line announcing a compile.
    """
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
        directory = build_directory(name)
        key = _build_key(name, sources, cflags, kwargs.get("extra_cuda_cflags", []))
        if not _is_cached(directory, name, key):
            announce(with_cuda, why, directory)
        module = cpp_extension.load(
            name=name,
            sources=sources,
            extra_cflags=cflags,
            extra_ldflags=["-fopenmp"],
            build_directory=directory,
            verbose=verbose,
            **kwargs,
        )
        try:
            (Path(directory) / STAMP).write_text(key + "\n")
        except OSError:  # a read-only cache still works; the line is then printed again next time
            pass
        return module
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
        with_cuda, why = want_cuda()
        if with_cuda and cuda_home() is None:
            if cuda_requested():  # asked for explicitly: say that it cannot be done
                errors.append(f"{why} asks for the CUDA kernels but no CUDA toolkit was found "
                              f"(torch's CUDA_HOME has no bin/nvcc; set CUDA_HOME)")
                if require_ext():
                    _state["tried"] = True
                    raise RuntimeError(errors[-1])
            with_cuda, why = False, "no CUDA toolkit found"
        if with_cuda:
            try:
                module = build(with_cuda=True, verbose=verbose, why=why)
            except Exception as exc:  # compiler errors come as RuntimeError/OSError/...
                if require_ext():
                    _state["tried"] = True
                    raise RuntimeError(f"building the CUDA extension failed: {exc}") from exc
                errors.append(f"CUDA build failed ({type(exc).__name__}: {exc})")
                why = "the CUDA build failed"
        if module is None:
            try:
                module = build(with_cuda=False, verbose=verbose, why=why)
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
