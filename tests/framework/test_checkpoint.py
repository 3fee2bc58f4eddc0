import os

import pytest
import torch

from lossbench.framework.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def _state():
    return {"model": {"w": torch.arange(3.0)}, "optimizer": {}, "scheduler": {}, "epoch": 1,
            "global_step": 5, "config": {"lr": 0.1}}


def test_roundtrip_and_no_temp_left(tmp_path):
    p = str(tmp_path / "last.pt")
    save_checkpoint(p, _state())
    s = load_checkpoint(p)
    assert torch.equal(s["model"]["w"], torch.arange(3.0)) and s["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]


def test_truncated_file_is_a_clear_error(tmp_path):
    p = str(tmp_path / "last.pt")
    save_checkpoint(p, _state())
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(p)


def test_foreign_or_missing(tmp_path):
    p = str(tmp_path / "x.pt")
    torch.save({"model": {}}, p)
    with pytest.raises(CheckpointError, match="lacks"):
        load_checkpoint(p)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "none.pt"))


def test_failed_write_keeps_previous_checkpoint(tmp_path):
    p = str(tmp_path / "last.pt")
    save_checkpoint(p, _state())

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint(p, dict(_state(), epoch=2, extra=Boom()))
    assert load_checkpoint(p)["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]


def _big_state():
    g = torch.Generator().manual_seed(0)
    return dict(_state(), model={"w": torch.randn(20000, generator=g)})  # one 80 kB tensor record


def _tensor_offset(path: str, t: torch.Tensor) -> int:
    data = open(path, "rb").read()
    at = data.find(t.numpy().tobytes())
    assert at > 0, "the tensor's bytes are stored verbatim in the zip"
    return at


def test_flipped_byte_in_a_tensor_record_is_damaged(tmp_path):
    """Regression: torch.load skips the zip CRCs, so one flipped byte resumed from different weights."""
    p = str(tmp_path / "last.pt")
    state = _big_state()
    save_checkpoint(p, state)
    data = bytearray(open(p, "rb").read())
    data[_tensor_offset(p, state["model"]["w"]) + 40000] ^= 0x01
    open(p, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match=r"last\.pt.*damaged: CRC mismatch in member '[^']*data/0'"):
        load_checkpoint(p)


def test_zeroed_block_in_a_checkpoint_is_damaged(tmp_path):
    """Regression: 4 KiB of zeros inside a checkpoint (a lost disk block) loaded without an error."""
    p = str(tmp_path / "last.pt")
    state = _big_state()
    save_checkpoint(p, state)
    at = _tensor_offset(p, state["model"]["w"]) + 20000
    with open(p, "r+b") as f:
        f.seek(at)
        f.write(bytes(4096))
    with pytest.raises(CheckpointError, match=r"last\.pt.*damaged: CRC mismatch"):
        load_checkpoint(p)
