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


def test_explicit_default_loss_args_resume_a_run_saved_without_them():
    """The README's ``train.py -c configs/ce.yaml --name demo --resume`` on the demo run (``loss_args: {}``)."""
    from lossbench.framework.checkpoint import check_resumable, config_changes
    from lossbench.framework.config import parse_args, to_dict

    demo = to_dict(parse_args(["-c", "configs/demo.yaml"]))
    now = to_dict(parse_args(["-c", "configs/ce.yaml", "--name", "demo", "--resume"]))
    assert now["loss_args"] and not demo["loss_args"]  # ce.yaml spells the defaults out
    assert config_changes(demo, now) == []
    check_resumable(demo, now, "run", "hint")
    # a real change of a loss hyper-parameter is still refused, naming it
    smooth = to_dict(parse_args(["-c", "configs/ce.yaml", "--name", "demo", "--loss-args", "{\"label_smoothing\": 0.1}"]))
    assert config_changes(demo, smooth) == ["loss_args.label_smoothing: 0.0 -> 0.1"]
    with pytest.raises(CheckpointError, match=r"loss_args\.label_smoothing: 0\.0 -> 0\.1"):
        check_resumable(demo, smooth, "run", "hint")
    # another loss: its name and the arguments that differ
    assert "loss: 'ce' -> 'focal'" in config_changes(demo, to_dict(parse_args(["--loss", "focal"])))
