"""Where a result came from: library version and commit, torch, device, date (for metrics.json and config.yaml)."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from typing import Any, Dict, Optional

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def git_commit(folder: str = _ROOT) -> Optional[str]:
    """The checkout's commit (with ``+dirty`` when tracked files changed), or ``None`` outside a git checkout."""
    try:
        sha = subprocess.run(["git", "-C", folder, "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", folder, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "") if sha else None


def provenance(device: Optional[str] = None) -> Dict[str, Any]:
    """``{lossbench, commit, torch, python, platform, device, date}`` of this process."""
    import torch

    from .. import __version__

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name(0) if str(device).startswith("cuda") and torch.cuda.is_available() else platform.processor() or platform.machine()
    return {"lossbench": __version__, "commit": git_commit(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "device": str(device),
            "device_name": name, "threads": torch.get_num_threads(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
