import errno
import io
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


class _FullDisk(io.RawIOBase):
    """A file descriptor on a disk with ``room`` bytes left: a longer write raises ENOSPC, as the kernel does."""

    def __init__(self, fd: int, room: int):
        self.fd, self.room = fd, room

    def writable(self):
        return True

    def fileno(self):
        return self.fd

    def write(self, b):
        if len(b) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(b)
        return os.write(self.fd, b)

    def close(self):
        if not self.closed:
            os.close(self.fd)
        super().close()


@pytest.mark.parametrize("room", [0, 1000, 60000])  # at the first write, in a header, inside the tensor record
def test_full_disk_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, room):
    """Regression: a full disk ended in torch's ``RuntimeError: [enforce fail at inline_container.cc:672]
    unexpected pos ...`` that named neither the file nor the cause."""
    from lossbench.framework.io import WriteFailedError

    p = str(tmp_path / "last.pt")
    save_checkpoint(p, _big_state())
    monkeypatch.setattr(os, "fdopen", lambda fd, mode="r", *a, **k: io.BufferedWriter(_FullDisk(fd, room)))
    with pytest.raises(WriteFailedError, match=r"writing '[^']*last\.pt' failed: the disk is full") as info:
        save_checkpoint(p, dict(_big_state(), epoch=2))
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert load_checkpoint(p)["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]  # no temp file left


def test_torch_zip_writer_error_says_the_disk_may_be_full(tmp_path):
    """The bare zip-writer error (no OSError in its chain) still names the file and the likely cause."""
    from lossbench.framework.io import WriteFailedError, atomic_write_bytes

    p = tmp_path / "best.pt"
    p.write_bytes(b"previous")

    def write(f):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    with pytest.raises(WriteFailedError, match=r"writing '[^']*best\.pt' failed: .*the disk may be full"):
        atomic_write_bytes(str(p), write)
    assert p.read_bytes() == b"previous" and os.listdir(tmp_path) == ["best.pt"]


def test_full_disk_is_one_line_for_the_scripts(capsys):
    from lossbench.framework.cli import run_main
    from lossbench.framework.io import WriteFailedError

    def main(argv):
        raise WriteFailedError("writing 'runs/x/last.pt' failed: the disk is full (No space left on device)")

    assert run_main("train.py", main, []) == 2
    assert capsys.readouterr().err == ("train.py: error: writing 'runs/x/last.pt' failed: the disk is full "
                                       "(No space left on device)\n")


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


def test_zip_damage_names_a_member_with_an_unknown_compression_method(tmp_path):
    """A damaged central directory can name a compression method zipfile cannot decode: that is
    reported as an unreadable member, not raised."""
    import struct

    import torch

    from lossbench.integrity import zip_damage

    path = tmp_path / "t.pt"
    torch.save({"w": torch.arange(8.0)}, path)
    assert zip_damage(path) is None
    data = bytearray(path.read_bytes())
    at = data.find(b"PK\x01\x02")  # the first central-directory header; its method field is at +10
    struct.pack_into("<H", data, at + 10, 99)
    path.write_bytes(bytes(data))
    assert "compression method 99" in zip_damage(path)
