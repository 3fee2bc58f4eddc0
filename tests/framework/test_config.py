import pytest

from lossbench.framework.config import ConfigError, parse_args


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def test_defaults_file_and_cli_precedence(tmp_path):
    assert parse_args([]).lr == 2e-3
    cfg = _write(tmp_path, "lr: 0.5\nepochs: 3\nloss_args: {label_smoothing: 0.1}\nid-classes: 0,1,2\n")
    args = parse_args(["-c", cfg])
    assert args.lr == 0.5 and args.epochs == 3 and args.loss_args == {"label_smoothing": 0.1}
    assert args.id_classes == [0, 1, 2]
    args = parse_args(["-c", cfg, "--lr", "0.1", "--loss-args", '{"log_partition_coef": 2}'])
    assert args.lr == 0.1 and args.epochs == 3 and args.loss_args == {"log_partition_coef": 2}


def test_unknown_key_names_key_and_valid_ones(tmp_path):
    cfg = _write(tmp_path, "lr: 0.1\nlearning_rate: 0.2\n")
    with pytest.raises(ConfigError, match="unknown config key 'learning_rate'.*valid keys are:.*lr"):
        parse_args(["-c", cfg])


def test_bad_values(tmp_path):
    with pytest.raises(ConfigError, match="epochs"):
        parse_args(["--epochs", "0"])
    with pytest.raises(ConfigError, match="must be a mapping"):
        parse_args(["-c", _write(tmp_path, "loss_args: 3\n")])
    with pytest.raises(ConfigError, match="does not exist"):
        parse_args(["-c", str(tmp_path / "missing.yaml")])


def test_every_shipped_config_parses():
    from pathlib import Path

    for p in sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml")):
        if p.name.startswith("bench"):
            continue
        args = parse_args(["-c", str(p)])
        assert args.loss, p
