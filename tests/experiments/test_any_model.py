"""eval.py on a classifier not trained here: --model (timm / torchvision:) with --weights, the model's own
input normalisation, one-line errors for weights that do not fit, and every score through evaluate_model."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from lossbench.errors import UserInputError
from lossbench.experiments.any_model import input_spec, read_weights
from lossbench.framework.checkpoint import save_checkpoint, weights_only
from lossbench.framework.cli import run_main
from lossbench.framework.data import get_data
from ood import adapt_classifier, list_scores, penultimate_features

tvm = pytest.importorskip("torchvision.models")
timm = pytest.importorskip("timm")

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ["--data", "digits", "--max-train-samples", "120", "--max-ood-samples", "40", "--no-progress",
          "--no-feature-cache"]
VIT_KWARGS = {"img_size": 16, "patch_size": 4, "depth": 2}
#: Settings for 120 training images: Mahalanobis on the penultimate layer only, ViM's subspace below 120.
SCORE_ARGS = json.dumps({"mahalanobis": {"layers": "penultimate"}, "vim": {"dim": 64}})


def _eval_main():
    spec = importlib.util.spec_from_file_location("eval_script", ROOT / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _error_line(capsys, argv) -> str:
    """eval.py ``argv``: exit status 2 and exactly one ``eval.py: error:`` line (no traceback); that line."""
    assert run_main("eval.py", _eval_main(), argv) == 2
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("eval.py: error: "), err
    return lines[0]


def _resnet18(num_classes: int = 6) -> nn.Module:
    torch.manual_seed(0)
    return tvm.resnet18(num_classes=num_classes)


def _vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=6, **VIT_KWARGS)


def _nearest_mean_head(model: nn.Module, head: nn.Linear, name: str, model_kwargs=None, img_size=None) -> None:
    """Give the random network a nearest-class-mean head on its own features of the digits training
    split (as eval.py will preprocess them), so that every class has correctly classified training
    samples (SHE needs them): logits ``2 mu_c . h - |mu_c|^2`` rank classes by distance to their mean."""
    spec = input_spec(name, model_kwargs, img_size=img_size)
    bundle = get_data("digits", img_size=spec.size, channels=spec.channels, max_train_samples=120,
                      mean=spec.mean, std=spec.std)
    adapted = adapt_classifier(model).eval()  # timm models stay as they are: their own features interface
    x = torch.stack([bundle.train_eval[i][0] for i in range(len(bundle.train_eval))])
    y = torch.tensor([int(bundle.train_eval[i][1]) for i in range(len(bundle.train_eval))])
    with torch.no_grad():
        h = penultimate_features(adapted, x)
        mu = torch.stack([h[y == c].mean(0) for c in range(bundle.num_classes)])
        head.weight.copy_(2 * mu)
        head.bias.copy_(-(mu * mu).sum(1))
        acc = (adapted(x).argmax(1) == y).float().mean()
    assert acc > 0.3, acc  # a classifier, if a weak one


def _check_every_score(out: Path) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    every = set(list_scores())
    skipped = metrics["ood"]["skipped"]
    assert set(metrics["ood"]["results"]) | set(skipped) == every, (every - set(metrics["ood"]["results"]), skipped)
    # RankFeat and NAC hook stage maps (ood.find_stages): where there are none they skip, saying why; at
    # 16 px a torchvision ResNet-18's layer4 is 1 x 1 at the size and at twice it, so its stages are refused
    # rather than shifted by one
    staged = {"rankfeat": ("feature_info", "4-D feature map", "1 x 1 maps", "larger input size"),
              "nac": ("head.logits", "timm", "larger input size")}
    assert set(skipped) <= set(staged), skipped
    for name, why in skipped.items():
        assert any(w in why for w in staged[name]), (name, why)
    every = set(metrics["ood"]["results"])
    sets = {"heldout", "gaussian", "uniform"}
    with np.load(out / "scores.npz") as z:
        keys = set(z.files)
        for score in every:
            for s in sets:
                assert {f"{score}|{s}|id", f"{score}|{s}|ood"} <= keys, (score, s)
                assert np.isfinite(z[f"{score}|{s}|ood"]).all()
    for f in ("results.md", "roc.png", "reliability.png"):
        assert (out / f).stat().st_size > 0
    return metrics


@pytest.mark.slow  # every score on a ResNet-18: 15-20 s on a quiet 2-core CPU, minutes on a loaded one
def test_torchvision_resnet18_state_dict_every_score(tmp_path, capsys):
    model = _resnet18()
    _nearest_mean_head(model, model.fc, "torchvision:resnet18", img_size=16)
    weights = tmp_path / "r18.pth"
    # a DataParallel-style wrapped state_dict, as training scripts often save it
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, weights)
    out = tmp_path / "out"
    assert run_main("eval.py", _eval_main(), [
        "--model", "torchvision:resnet18", "--weights", str(weights), "--img-size", "16", "--scores", "all",
        "--score-args", SCORE_ARGS, "--out", str(out)] + DIGITS) == 0, \
        capsys.readouterr().err
    m = _check_every_score(out)
    info = m["model"]
    assert info["weights_kind"] == "state_dict" and info["features"].endswith("'fc'")
    assert info["input"]["mean"] == pytest.approx([0.485, 0.456, 0.406])  # torchvision's ImageNet transforms
    assert info["input"]["size"] == 16 and info["input"]["channels"] == 3
    assert m["test"]["acc"] > 1 / 6  # the nearest-mean head, loaded from the file


@pytest.mark.slow  # every score on a (2-block) ViT-Tiny
def test_timm_vit_state_dict_every_score(tmp_path, capsys):
    model = _vit()
    _nearest_mean_head(model, model.head, "vit_tiny_patch16_224", VIT_KWARGS)
    weights = tmp_path / "vit.pth"
    torch.save(model.state_dict(), weights)
    out = tmp_path / "out"
    assert run_main("eval.py", _eval_main(), [
        "--model", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(VIT_KWARGS), "--weights", str(weights),
        "--scores", "all", "--score-args", SCORE_ARGS, "--out", str(out)]
        + DIGITS) == 0, capsys.readouterr().err
    m = _check_every_score(out)
    assert m["model"]["input"]["mean"] == [0.5, 0.5, 0.5]  # the model's pretrained_cfg, not the data's
    assert m["model"]["input"]["size"] == 16 and "img_size" in m["model"]["input"]["from"]["size"]


# ---- fast checks: the weights files, the preprocessing, the one-line errors ---------------------------------
def test_read_weights_unwraps_and_strips_prefixes(tmp_path):
    sd = _resnet18().state_dict()
    for i, wrapped in enumerate([sd, {"state_dict": sd}, {"model": {f"module.{k}": v for k, v in sd.items()}},
                                 {"model": {f"_orig_mod.{k}": v for k, v in sd.items()}, "optimizer": {}}]):
        path = tmp_path / f"w{i}.pth"
        torch.save(wrapped, path)
        w = read_weights(str(path))
        assert w.kind == "state_dict" and list(w.state_dict) == list(sd)
        assert all(torch.equal(w.state_dict[k], v) for k, v in sd.items())
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    assert set(read_weights(str(tmp_path / "w.safetensors")).state_dict) == set(sd)


def test_read_weights_refuses_pickled_code_and_non_state_dicts(tmp_path):
    torch.save(_resnet18(), tmp_path / "module.pth")  # a whole pickled module: not loaded (weights_only)
    with pytest.raises(UserInputError, match=r"holds pickled objects other than tensors \(torch.nn.modules"):
        read_weights(str(tmp_path / "module.pth"))
    torch.save({"fc.weight": torch.zeros(2, 2), "note": "x"}, tmp_path / "mixed.pth")
    with pytest.raises(UserInputError, match="not a state_dict: it has entries that are not tensors \\(note\\)"):
        read_weights(str(tmp_path / "mixed.pth"))
    with pytest.raises(UserInputError, match="does not exist"):
        read_weights(str(tmp_path / "none.pth"))


def test_lossbench_checkpoints_full_and_weights_only(tmp_path, capsys):
    from lossbench.framework.config import parse_args, to_dict
    from lossbench.framework.models import create_model
    from lossbench.framework.runtime import rng_state

    args = parse_args(["--model", "test_resnet", "--img-size", "16"])
    torch.manual_seed(0)
    model = create_model("test_resnet", 6, "ce", {}, in_chans=1)
    opt = torch.optim.AdamW(model.parameters())
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": {}, "epoch": 3,
             "global_step": 9, "config": to_dict(args), "num_classes": 6, "classes": list("012345"),
             "rng": rng_state()}  # numpy RNG arrays: allowed, nothing else is
    save_checkpoint(str(tmp_path / "last.pt"), state)
    save_checkpoint(str(tmp_path / "best.pt"), weights_only(state))
    for name in ("last.pt", "best.pt"):
        w = read_weights(str(tmp_path / name))
        assert w.kind == "lossbench" and w.checkpoint["epoch"] == 3 and set(w.state_dict) == set(model.state_dict())
    out = tmp_path / "out"
    assert run_main("eval.py", _eval_main(), ["--weights", str(tmp_path / "best.pt"), "--scores", "msp,energy",
                                              "--ood", "gaussian", "--out", str(out)] + DIGITS) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["model"]["weights_kind"] == "lossbench" and m["epoch"] == 3
    assert m["model"]["input"]["mean"] == [0.3] and m["model"]["input"]["size"] == 16  # the run's own data spec
    capsys.readouterr()
    line = _error_line(capsys, ["--model", "resnet18", "--weights", str(tmp_path / "last.pt"), "--out", str(out)]
                       + DIGITS)
    assert "is a lossbench checkpoint of 'test_resnet'" in line
    line = _error_line(capsys, ["--weights", str(tmp_path / "last.pt"), "--model-kwargs", '{"img_size": 8}',
                                "--out", str(out)] + DIGITS)
    assert "--model-kwargs does not apply" in line


def test_weights_that_do_not_fit_are_one_line_naming_file_and_keys(tmp_path, capsys):
    torch.save(_resnet18(num_classes=10).state_dict(), tmp_path / "ten.pth")
    line = _error_line(capsys, ["--model", "torchvision:resnet18", "--weights", str(tmp_path / "ten.pth"),
                                "--img-size", "16", "--out", str(tmp_path / "o")] + DIGITS)
    assert "ten.pth" in line and "shape mismatch fc.weight (file (10, 512), model (6, 512))" in line
    torch.manual_seed(0)
    torch.save(tvm.resnet34(num_classes=6).state_dict(), tmp_path / "r34.pth")
    line = _error_line(capsys, ["--model", "torchvision:resnet18", "--weights", str(tmp_path / "r34.pth"),
                                "--img-size", "16", "--out", str(tmp_path / "o")] + DIGITS)
    assert "r34.pth" in line and "unexpected keys layer1.2.conv1.weight" in line
    torch.save(_vit().state_dict(), tmp_path / "vit.pth")
    line = _error_line(capsys, ["--model", "torchvision:resnet18", "--weights", str(tmp_path / "vit.pth"),
                                "--img-size", "16", "--out", str(tmp_path / "o")] + DIGITS)
    assert "missing keys conv1.weight, bn1.weight" in line and "unexpected keys cls_token" in line


@pytest.mark.parametrize("argv, message", [
    (["--model", "torchvision:resnet18", "--out", "{tmp}"], "needs --weights FILE: without --weights the model would "
                                                           "have random weights"),
    (["--model", "torchvision:resnet18", "--weights", "{tmp}/w.pth"], "--out is required with --model"),
    (["--model", "torchvision:resnet18", "--weights", "{tmp}/w.pth", "--out", "{tmp}", "--data", "digits",
      "--random-init"], "--random-init and --weights exclude each other"),
    (["--model", "torchvision:no_such_net", "--random-init", "--out", "{tmp}"], "no torchvision classification model"),
    (["--model", "no_such_timm_net", "--random-init", "--out", "{tmp}"], "not a timm model name"),
    (["--run", "{tmp}", "--data", "digits", "--img-size", "8"], "--data, --img-size apply to a model trained elsewhere"),
    (["--scores", "msp"], "give one of --run RUN, --checkpoint FILE, or --model NAME"),
    (["--model", "torchvision:resnet18", "--random-init", "--out", "{tmp}", "--scores", "nope"],
     "unknown OOD score name 'nope'"),
    (["--model", "torchvision:resnet18", "--random-init", "--out", "{tmp}", "--mean", "0.5"],
     "mean and std must be given together"),
    (["--model", "torchvision:resnet18", "--random-init", "--out", "{tmp}", "--tv-weights", "NOPE"],
     "--tv-weights 'NOPE' is not a weights name of resnet18; expected one of ['IMAGENET1K_V1']"),
])
def test_any_model_user_errors(tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--data" not in argv and "--run" not in argv and "--model" in argv:
        argv += ["--data", "digits"]
    (tmp_path / "w.pth").write_bytes(b"")
    assert message in _error_line(capsys, argv)


def test_random_init_on_purpose_runs(tmp_path, capsys):
    out = tmp_path / "out"
    assert run_main("eval.py", _eval_main(), ["--model", "torchvision:resnet18", "--random-init", "--img-size", "16",
                                              "--scores", "msp", "--ood", "gaussian", "--out", str(out)]
                    + DIGITS) == 0, capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    assert m["model"]["weights_kind"] == "random init" and m["checkpoint"] is None


def test_input_spec_follows_the_model():
    r = input_spec("resnet18.a1_in1k")  # a pretrained tag: that tag's normalisation and size
    assert r.mean == pytest.approx((0.485, 0.456, 0.406)) and r.size == 224 and r.channels == 3
    v = input_spec("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4})
    assert v.mean == (0.5, 0.5, 0.5) and v.size == 32  # timm keeps 224 in the config; the model takes 32
    assert input_spec("vit_tiny_patch16_224", {"img_size": 32}, img_size=48).size == 48
    t = input_spec("torchvision:resnet18", tv_weights="IMAGENET1K_V1")
    assert t.size == 224 and t.std == pytest.approx((0.229, 0.224, 0.225))
    e = input_spec("torchvision:resnet18", mean=[0.5], std=[0.25, 0.25, 0.25], img_size=20)
    assert e.mean == (0.5, 0.5, 0.5) and e.size == 20 and e.source["normalisation"] == "--mean / --std"
    with pytest.raises(UserInputError, match="std must hold 1 or 3 finite values"):
        input_spec("torchvision:resnet18", mean=[0.5], std=[0.2, 0.2])


def test_digits_as_three_channels_for_rgb_models():
    one, three = get_data("digits", img_size=8), get_data("digits", img_size=8, channels=3, mean=[0.5], std=[0.5])
    x1, x3 = one.test[0][0], three.test[0][0]
    assert x1.shape == (1, 8, 8) and x3.shape == (3, 8, 8) and three.spec.channels == 3
    torch.testing.assert_close(x3[0], x3[2])  # grey replicated
    torch.testing.assert_close((x3[0] * 0.5 + 0.5), (x1[0] * 0.33 + 0.3))  # the same pixels, other normalisation
