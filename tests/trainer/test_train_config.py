"""transmix-train's command line: YAML first, flags win, unknown names are errors naming them,
and every bad configuration stops before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
import sklearn  # noqa: F401  (the train extra: a missing extra fails here, never skips)

from train_tiny import TINY
from transmix_train.config import (config_dict, ConfigError, default_config_path, parse_args, read_config, save_config,
                                   validate_config)
from transmix_train.engine import StepConfig
from transmix_train.main import main


def _yaml(tmp_path: Path, **values) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_no_config_reads_demo_yaml():
    args = parse_args([])
    assert Path(args.config).name == "demo.yaml"
    assert (args.data, args.mix, args.img_size, args.hflip) == ("digits", "transmix", 32, 0.0)
    assert args.model_kwargs["img_size"] == 32 and args.epochs == 70


def test_configs_and_grids_are_package_data_of_the_trainer():
    """The configs live inside transmix_train (no remap in setup.py): demo.yaml, the family configs
    and transmix-experiment's grids all resolve under the imported package's folder."""
    import transmix_train
    from transmix_train.experiments import grid_dir

    package = Path(transmix_train.__file__).parent
    assert default_config_path() == package / "configs" / "demo.yaml" and default_config_path().is_file()
    assert grid_dir() == package / "configs" / "grids"
    assert {"table1.yaml", "table2.yaml", "table3.yaml", "distill.yaml"} <= {p.name for p in grid_dir().glob("*.yaml")}


def test_yaml_then_flags_win(tmp_path):
    config = _yaml(tmp_path, epochs=7, mixup_switch_prob=0.8, attn_source="3", model_kwargs={"depth": 4})
    args = parse_args(["--config", config, "--epochs", "9", "--model-kwargs", "num_heads=2"])
    assert args.epochs == 9  # the flag wins
    assert args.mixup_switch_prob == 0.8  # the file's value
    assert args.attn_source == 3  # converted as the flag would be
    assert args.model_kwargs == {"depth": 4, "num_heads": 2}  # a flag changes only its keys
    assert parse_args(["--config", config]).epochs == 7


def test_saved_config_reproduces_the_run(tmp_path):
    args = parse_args(["--epochs", "3", "--attn-source", "rollout", "--crop-scale", "0.3", "1.0"])
    path = save_config(args, tmp_path)
    again = parse_args(["--config", str(path)])
    assert config_dict(again) == {**config_dict(args), "config": str(path)}


@pytest.mark.parametrize("values, named", [
    ({"epochz": 3}, "unknown key 'epochz'"),
    ({"mixup-alpha": 1.0}, "unknown key 'mixup-alpha'"),
    ({"mixup-switch-prob": 0.8}, "did you mean 'mixup_switch_prob'"),
    ({"epochs": 1.5}, "key 'epochs'"),
    ({"mix": "cutmixx"}, "key 'mix': invalid choice 'cutmixx'"),
    ({"model_ema": "yes"}, "key 'model_ema': expected true or false"),
], ids=["unknown", "timm-alias", "hyphen", "type", "choice", "bool"])
def test_bad_yaml_key_is_named(tmp_path, capsys, values, named):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--config", _yaml(tmp_path, **values)])
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


def test_unknown_flag_is_named(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--mixup-alpha", "0.5"])
    assert "unrecognized arguments: --mixup-alpha" in capsys.readouterr().err


def test_missing_config_file(capsys, tmp_path):
    with pytest.raises(SystemExit):
        parse_args(["--config", str(tmp_path / "nope.yaml")])
    assert "no such file" in capsys.readouterr().err


BAD_RUNS = {
    "unknown-model": (["--model", "deit_tinyy_patch16_224"], "--model 'deit_tinyy_patch16_224': not a timm model"),
    "model-kwarg": (["--model-kwargs", "depthh=2"], "does not accept these --model-kwargs"),
    "probe-family": (["--model", "resnet18", "--model-kwargs"], None),  # completed in the test (config file)
    "attn-source": (["--attn-source", "7"], "--attn-source 7"),
    "missing-data": (["--data", "/nonexistent/imagenet"], "--data '/nonexistent/imagenet'"),
    "odd-batch": (["--batch-size", "15"], "--batch-size 15 per process is odd"),
    "unwritable-output": (["--output", "/proc/transmix_test/out"], "cannot write in /proc"),
    "eval-without-ckpt": (["--eval-only"], "--eval-only needs --resume"),
    "resume-missing": (["--resume", "/nonexistent/last.pth"], "--resume /nonexistent/last.pth: no such file"),
    "mixup-alpha": (["--mix", "mixup", "--mixup", "0"], "--mix mixup needs --mixup > 0"),
    "teacher-missing": (["--distillation-type", "hard"], "--distillation-type hard needs --teacher"),
}


@pytest.mark.parametrize("case", sorted(BAD_RUNS))
def test_bad_configuration_stops_before_writing(tmp_path, capsys, case):
    extra, named = BAD_RUNS[case]
    output = tmp_path / "run"
    argv = [*TINY, *extra]
    if case == "probe-family":
        config = _yaml(tmp_path, data="digits", img_size=32, model="resnet18", mix="transmix", batch_size=16)
        argv = ["--config", config, "--device", "cpu"]
        named = "--model 'resnet18': TransMix cannot read its attention"
    if "--output" not in argv:
        argv += ["--output", str(output)]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    # sys.exit(message) from the trainer, or argparse's error (exit 2, message on stderr).
    assert named in f"{exit_info.value.code} {capsys.readouterr().err}"
    assert not output.exists(), "a bad configuration left an output folder behind"


def test_existing_run_is_not_overwritten(tmp_path):
    (tmp_path / "last.pth").write_bytes(b"previous run")
    with pytest.raises(SystemExit) as exit_info:
        main([*TINY, "--output", str(tmp_path)])
    assert "already holds a run" in str(exit_info.value.code)
    assert (tmp_path / "last.pth").read_bytes() == b"previous run"


def test_batch_must_divide_over_processes():
    args = parse_args([*TINY, "--total-batch-size", "36"])
    with pytest.raises(ConfigError, match="--total-batch-size 36 is not divisible by the 8 processes"):
        validate_config(args, world_size=8)
    with pytest.raises(ConfigError, match="--batch-size 9 per process is odd"):
        validate_config(args, world_size=4)
    before = vars(args).copy()
    validate_config(args, world_size=2)
    assert vars(args) == before, "validation changed the config"


@pytest.mark.parametrize("argv, named", [
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--epochs", "many"], "--epochs: invalid int value: 'many'"),
    (["--mix", "blend"], "--mix: invalid choice: 'blend'"),
    (["--config", "/nonexistent.yaml"], "--config: no such file: /nonexistent.yaml"),
], ids=["unknown-flag", "bad-type", "bad-choice", "missing-config"])
def test_reading_a_config_raises_instead_of_exiting(argv, named):
    # Parsing is a function (the experiment runner calls it per cell); only the command line exits.
    with pytest.raises(ConfigError) as error:
        read_config(argv)
    assert named in str(error.value)


@pytest.mark.parametrize("argv, named", [
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--aug-repeats", "1"], "--aug-repeats 1 repeats nothing"),
    (["--bce-sum"], "--bce-sum sets up the BCE loss: it needs --bce-loss"),
    (["--teacher-path", "x.pth"], "--teacher-path gives the weights of --teacher-model NAME"),
], ids=["epochs", "aug-repeats", "bce-without-loss", "teacher-path-alone"])
def test_validation_is_one_step_apart_from_parsing(argv, named):
    args = read_config([*TINY, *argv])  # parses: each value has the right type
    with pytest.raises(ConfigError, match=named.replace("-", "\\-").replace(".", "\\.")):
        validate_config(args)


def test_step_config_is_frozen():
    step = StepConfig(device=torch.device("cpu"))
    with pytest.raises(AttributeError):
        step.progress = True
