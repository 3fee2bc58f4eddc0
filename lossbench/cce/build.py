"""Build the cut cross-entropy extension ahead of time: ``python -m lossbench.cce.build``.

Compiles the CPU kernels and, when torch finds the CUDA toolkit (its ``CUDA_HOME`` detection;
set ``CUDA_HOME`` if ``nvcc`` is elsewhere), the CUDA kernels too -- for ``TORCH_CUDA_ARCH_LIST``,
default ``"8.0;9.0"`` -- even on a machine without a GPU. The build lands in torch's extension
cache or ``$LOSSBENCH_EXT_DIR`` and is re-used until the sources or flags change.
Exits non-zero when a requested build fails.
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
    parser.add_argument("--cpu-only", action="store_true", help="skip the CUDA kernels")
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands")
    args = parser.parse_args(argv)

    home = None if args.cpu_only else ext.cuda_home()
    if home is None and not args.cpu_only:
        print("CUDA toolkit: not found (torch's CUDA_HOME has no bin/nvcc and "
              "include/cuda_runtime.h); building the CPU kernels only")
    elif home is not None:
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or ext.DEFAULT_CUDA_ARCH_LIST
        print(f"CUDA toolkit: {home} (TORCH_CUDA_ARCH_LIST={arch})")
    start = time.perf_counter()
    try:
        module = ext.build(with_cuda=home is not None, verbose=args.verbose)
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
