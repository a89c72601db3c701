"""``transmix-experiment``: the paper's comparison tables, re-run on your data with several seeds.

    transmix-experiment table2                              # embedded shapes, CPU scale, 3 seeds
    transmix-experiment table2 --data digits --seeds 3 --budget-minutes 30
    transmix-experiment my_grid.yaml --config my_trainer.yaml --train-args "--epochs 100"

A grid (``table1``, ``table2``, ``table3``, ``distill`` in ``transmix_train/configs/grids``, or a
YAML file of the same form) names cells; each cell is one ``transmix-train`` run per seed, started
as a subprocess with its own ``--output``. Each run's folder is named by a hash of its resolved
trainer config, so a finished run (``result.json``) is never run again, a killed one continues
from its ``last.pth``, and grids that share a cell (Table 3's +CutMix is Table 2's CutMix)
share its runs when they write to the same ``--output``. Runs go seed by seed (every cell's
seed 0, then seed 1, ...), so a budget that runs out leaves every cell with as many seeds as
possible; a run is not started when the mean time of the runs so far says it would not fit.

Grid YAML::

    title: Supplementary Table 2 ...           # the table's heading
    config: cpu_scale.yaml                     # trainer config (relative: the grid's folder)
    args: [--epochs, "8"]                      # flags of every run
    reference: CutMix                          # the cell the others are compared with
    prerequisites:                             # trained once per data set (seed 0) before the cells
      extractor: {config: cpu_scale_cnn.yaml, args: [--model, resnet18, --mix, none]}
    cells:
      - {name: CutMix, args: [--mix, cutmix], paper: 79.8}
      - {name: Attentive-CutMix, args: [--mix, attentive_cutmix, --attentive-checkpoint, "{extractor}"],
         paper: 77.5, extra_params: extractor}  # {name} -> the prerequisite's last.pth

Outputs in ``--output``: ``<grid>.md`` (mean and std of the final-epoch val top-1 over seeds,
the difference to the reference with its standard error, parameters, images/s, wall time per
run), ``<grid>.png`` (bars with std error bars and the seeds as dots), ``<grid>.json``, and
``runs/<cell>-<hash>/`` with each run's ``metrics.csv``, ``config.yaml``, ``train.log`` and
``result.json``.

One module per job: :mod:`.grid` (the YAML read and checked), :mod:`.planning` (cells and seeds
into runs and their folders), :mod:`.runner` (the subprocesses, the budget), :mod:`.stats`
(means, standard errors), :mod:`.report` (the Markdown table and JSON), :mod:`.plot` (the
PNG), :mod:`.cli` (the command line).
"""

from .cli import build_parser, main
from .grid import BUILTIN_GRIDS, Cell, Grid, grid_dir, load_grid
from .planning import RunSpec, plan_runs
from .report import write_outputs
from .runner import run_grid
from .stats import summarise

__all__ = [
    "BUILTIN_GRIDS",
    "Cell",
    "Grid",
    "RunSpec",
    "build_parser",
    "grid_dir",
    "load_grid",
    "main",
    "plan_runs",
    "run_grid",
    "summarise",
    "write_outputs",
]
