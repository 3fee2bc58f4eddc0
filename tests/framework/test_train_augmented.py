"""End-to-end: the trainer with augmentation, mixup, device-side augmentation and the small stem."""

import pytest
import torch

from lossbench.framework.builders import load_run
from lossbench.framework.config import parse_args
from lossbench.framework.trainer import Trainer

pytestmark = pytest.mark.slow


def _args(folder, out, name, *extra):
    return parse_args(["--data", f"imagefolder:{folder}", "--model", "test_resnet", "--img-size", "16",
                       "--val-fraction", "0.2", "--batch-size", "6", "--epochs", "2", "--opt", "sgd", "--lr", "0.05",
                       "--output", str(out), "--name", name, "--no-progress", "--seed", "3", *extra])


@pytest.mark.parametrize("extra", [["--mixup", "0.2", "--cutmix", "1.0", "--device-augment", "on"],
                                   ["--auto-augment", "trivialaugment", "--reprob", "0.25"]])
def test_augmented_run_resumes_to_the_same_weights(image_folder, tmp_path, extra):
    full = Trainer(_args(image_folder, tmp_path, "full", "--small-stem", *extra))
    assert full.args.augment == "cifar" and full.bundle.augment is not None
    assert (full.batch_augment is not None) == ("--device-augment" in extra)
    full.fit()
    part = Trainer(_args(image_folder, tmp_path, "part", "--small-stem", "--stop-after-epochs", "1", *extra))
    part.fit()
    rest = Trainer(_args(image_folder, tmp_path, "part", "--small-stem", "--resume", *extra))
    rest.fit()
    a, b = full.model.state_dict(), rest.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    model, args, bundle, _ = load_run(str(tmp_path / "full" / "last.pt"))
    assert args.small_stem and model.backbone.maxpool.__class__.__name__ == "Identity"


def test_resume_refuses_a_changed_augmentation(image_folder, tmp_path):
    from lossbench.framework.checkpoint import CheckpointError

    Trainer(_args(image_folder, tmp_path, "r", "--stop-after-epochs", "1")).fit()
    with pytest.raises(CheckpointError, match="augment: 'cifar' -> 'none'"):
        Trainer(_args(image_folder, tmp_path, "r", "--resume", "--augment", "none")).fit()
