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
