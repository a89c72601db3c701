"""The `family` grid of transmix-experiment: it loads by name, plans one run per cell and seed on
the digits demo config, and each cell's flags build its mixer on the demo's model (no training)."""

from __future__ import annotations

import pytest

from transmix_train.config import parse_args
from transmix_train.experiments import load_grid, main, plan_runs
from transmix_train.mixers import create_mixer
from transmix_train.model import build_model

CELLS = {"CutMix": "cutmix", "TransMix": "transmix", "MixPro": "mixpro", "TokenMix": "tokenmix"}


def test_family_grid_plans_every_cell_on_the_demo_config(tmp_path):
    grid = load_grid("family")
    assert [cell.name for cell in grid.cells] == list(CELLS) and grid.reference == "CutMix"
    prerequisites, runs = plan_runs(grid, tmp_path / "out", 2, data="digits")
    assert not prerequisites and len(runs) == 2 * len(CELLS)
    assert len({spec.output for spec in runs}) == len(runs)  # one folder per cell and seed
    for spec in runs:
        args = parse_args(spec.argv)
        assert args.data == "digits" and args.mix == CELLS[spec.cell.name] and args.seed == spec.seed
        assert spec.argv[spec.argv.index("--config") + 1].endswith("demo.yaml")


def test_each_cell_builds_its_mixer_on_the_demo_model(tmp_path):
    _, runs = plan_runs(load_grid("family"), tmp_path / "out", 1)
    for spec in runs:
        args = parse_args(spec.argv)
        model = build_model(args, 10)
        mixing = create_mixer(args, 10, model, seed=0)
        assert mixing.name == CELLS[spec.cell.name]
        if mixing.name == "tokenmix":  # the 4x4 grid of the demo: a mask of part of the tokens, not all
            assert mixing.mixer.num_masked((4, 4)) == 9


def test_the_cli_knows_the_grid(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["family", "--help"])
    assert exit_info.value.code == 0 and "grid" in capsys.readouterr().out
