import os
import subprocess
import sys

import pytest
import timm
import torch

from lossbench.framework.models import PretrainedWeightsError, create_backbone


def test_pretrained_file_loads_local_weights(tmp_path):
    src = timm.create_model("resnet10t", num_classes=7, in_chans=1)
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    bb = create_backbone("resnet10t", in_chans=1, pretrained_file=str(path))
    assert bb.num_classes == 0
    for k, v in bb.state_dict().items():
        torch.testing.assert_close(v, src.state_dict()[k])


def test_pretrained_file_missing():
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        create_backbone("resnet10t", pretrained_file="no/such/file.pth")


def test_pretrained_offline_says_use_file():
    # a fresh interpreter, so the hub library reads HF_HUB_OFFLINE at import (no network wait)
    code = (
        "from lossbench.framework.models import create_backbone, PretrainedWeightsError\n"
        "try:\n    create_backbone('resnet10t', pretrained=True)\n"
        "except PretrainedWeightsError as e:\n    print('ERR', e)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.startswith("ERR") and "--pretrained-file" in out.stdout, out.stdout + out.stderr


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown timm model name"):
        create_backbone("resnet_nope")
