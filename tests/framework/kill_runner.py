"""Run train.py in this process and SIGKILL it at a chosen point (used by test_killsafe.py).

    python tests/kill_runner.py forward:N  <train.py args>   # killed at the N-th training forward pass
    python tests/kill_runner.py save:N     <train.py args>   # killed half-way through writing the N-th checkpoint
"""

import io
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

import lossbench.framework.trainer as engine  # noqa: E402


def main() -> int:
    mode, n = sys.argv[1].split(":")
    n = int(n)
    calls = {"count": 0}
    if mode == "forward":
        original = engine.LossStep.forward

        def forward(self, *a, **k):
            calls["count"] += 1
            if calls["count"] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, *a, **k)

        engine.LossStep.forward = forward
    elif mode == "save":
        original_save = torch.save

        def save(obj, f, *a, **k):
            calls["count"] += 1
            if calls["count"] == n and hasattr(f, "write"):
                buf = io.BytesIO()
                original_save(obj, buf, *a, **k)
                data = buf.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            return original_save(obj, f, *a, **k)

        torch.save = save
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    sys.argv = ["train.py"] + sys.argv[2:]
    import runpy

    runpy.run_path(str(Path(__file__).resolve().parents[2] / "train.py"), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
