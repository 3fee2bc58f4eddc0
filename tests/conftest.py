import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHARED_DATA = Path(os.environ.get("LOSSBENCH_SHARED_DATA", ROOT.parent / "shared" / "datasets"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data sets shipped beside the project (skip when absent)."""
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip(f"shared data sets not found at {SHARED_DATA}")
    return SHARED_DATA
