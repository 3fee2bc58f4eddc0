"""End-to-end: configs/cifar10_fast.yaml's trainer features on a tiny image folder."""

import os

import pytest
import torch

from lossbench.framework.builders import load_run
from lossbench.framework.config import ConfigError, parse_args
from lossbench.framework.nets.airbench import whitening_filters
from lossbench.framework.trainer import Trainer

pytestmark = pytest.mark.slow

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "cifar10_fast.yaml")


def _args(folder, out, name, *extra):
    return parse_args(["-c", CONFIG, "--data", f"imagefolder:{folder / 'train'}", "--test-folder", str(folder / "test"),
                       "--val-fraction", "0.2", "--batch-size", "4", "--epochs", "4.5", "--amp", "off",
                       "--warmup-epochs", "1", "--wa-every", "2", "--output", str(out), "--name", name,
                       "--no-progress", "--seed", "3", *extra])


def test_fast_recipe_whitens_averages_and_resumes_exactly(image_folder, tmp_path):
    full = Trainer(_args(image_folder, tmp_path, "full"))
    assert full.batch_augment is not None and full.batch_augment.alternating
    assert full.steps_per_epoch == 3 and full.total_steps == 14  # ceil(4.5 * 3): fractional epochs
    full.fit()
    assert full.global_step == 14 and full.averager is not None and full.averager.finished
    # the stem holds the whitening filters of the first training images (its weight is frozen)
    imgs = torch.stack([full.bundle.train_eval[i][0] for i in range(len(full.bundle.train_eval))])
    torch.testing.assert_close(full.model.backbone.stem.weight, whitening_filters(imgs))
    assert not full.model.backbone.stem.bias.requires_grad  # frozen after whiten_bias_epochs (3)
    # the final weights are the average (lookahead's last step copies it in)
    for k, v in full.averager.average.items():
        assert torch.equal(full.model.state_dict()[k], v)
    # a run stopped after 2 epochs and resumed ends with the same weights
    part = Trainer(_args(image_folder, tmp_path, "part", "--stop-after-epochs", "2"))
    part.fit()
    rest = Trainer(_args(image_folder, tmp_path, "part", "--resume"))
    rest.fit()
    a, b = full.model.state_dict(), rest.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # best.pt holds the last epoch (keep: last) and evaluates with TTA
    model, args, bundle, state = load_run(str(tmp_path / "full" / "best.pt"))
    assert int(state["epoch"]) == 5 and args.tta == 2


def test_alternating_flips_need_the_batched_path(image_folder, tmp_path):
    with pytest.raises(ValueError, match="device_augment"):
        Trainer(_args(image_folder, tmp_path, "x", "--device-augment", "off"))
    with pytest.raises(ConfigError, match="lr_scale"):
        parse_args(["--lr-scale", '{"norm_bias": -1}'])


def test_precision_note_names_the_dtype_the_scaler_and_why():
    """A CUDA run under --amp auto used to be reported as 'native bf16 on this CPU' while it ran fp16."""
    from types import SimpleNamespace

    from lossbench.framework.trainer import Trainer

    def note(dtype, scaler, amp, device):
        return Trainer.precision_note(SimpleNamespace(amp_dtype=dtype, scaler=scaler, args=SimpleNamespace(amp=amp),
                                                      device=torch.device(device)))

    assert note(None, None, False, "cpu") == "float32"
    assert note(torch.bfloat16, None, "auto", "cpu") == "autocast bfloat16 (--amp auto: native bf16 on this CPU)"
    assert note(torch.float16, object(), "auto", "cuda") == "autocast float16 with a grad scaler (--amp auto: CUDA, --amp-dtype)"
    assert note(torch.bfloat16, None, True, "cuda") == "autocast bfloat16"
