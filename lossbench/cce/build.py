"""Build the cut cross-entropy extension ahead of time: ``python -m lossbench.cce.build``.

Compiles the CPU kernels and, where they are wanted (:func:`lossbench.cce.ext.want_cuda`:
``LOSSBENCH_BUILD_CUDA=1``, or a GPU present when it is unset), the CUDA kernels too -- for
``TORCH_CUDA_ARCH_LIST``, default ``"8.0;9.0"``; this needs the CUDA toolkit that torch finds (its
``CUDA_HOME`` detection; set ``CUDA_HOME`` if ``nvcc`` is elsewhere) but no GPU. ``--cuda`` asks for
the CUDA kernels whatever the machine (CI's compile check: ``make ext-cuda``), ``--cpu-only`` leaves
them out. The build lands in torch's extension cache or ``$LOSSBENCH_EXT_DIR`` and is re-used until
the sources or flags change. Exits non-zero when a requested build fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

from . import ext


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lossbench.cce.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--cpu-only", action="store_true", help="leave the CUDA kernels out")
    which.add_argument("--cuda", action="store_true",
                       help="compile the CUDA kernels too, with or without a GPU (an error without the toolkit)")
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands")
    args = parser.parse_args(argv)

    if args.cpu_only:
        with_cuda, why = False, "--cpu-only"
    elif args.cuda:
        with_cuda, why = True, "--cuda asks for them"
    else:
        try:
            with_cuda, why = ext.want_cuda()
        except ValueError as err:
            print(f"build failed: {err}", file=sys.stderr)
            return 2
    home = ext.cuda_home() if with_cuda else None
    if with_cuda and home is None:
        message = ("CUDA toolkit: not found (torch's CUDA_HOME has no bin/nvcc and include/cuda_runtime.h); "
                   "set CUDA_HOME")
        if args.cuda or ext.cuda_requested():
            print(f"build failed: the CUDA kernels were asked for ({why}) but {message}", file=sys.stderr)
            return 1
        print(f"{message}; building the CPU kernels only")
        with_cuda, why = False, "no CUDA toolkit found"
    if home is not None:
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or ext.DEFAULT_CUDA_ARCH_LIST
        print(f"CUDA toolkit: {home} (TORCH_CUDA_ARCH_LIST={arch}; {why})")
    else:
        print(f"CUDA kernels: left out ({why})")
    start = time.perf_counter()
    try:
        module = ext.build(with_cuda=with_cuda, verbose=args.verbose, why=why)
    except Exception as exc:  # report and fail
        print(f"build failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"built {module.__name__}: {module.__file__}")
    print(f"CUDA kernels: {'yes' if module.has_cuda() else 'no'}; "
          f"build directory: {os.path.dirname(module.__file__)}; "
          f"{time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
