"""--compile with TransMix on: the compiled run trains with the probe reading the attention of
each compiled forward, and matches the eager run."""

from __future__ import annotations

import pytest
import sklearn  # noqa: F401  (the train extra: a missing extra fails here, never skips)

from train_tiny import read_metrics, TINY
from transmix_train.main import main

# Every batch CutMix, so every target depends on the probe's attention.
ARGV = [*TINY, "--epochs", "1", "--mixup-switch-prob", "1.0"]
COMPARED = ("train_loss", "val_loss", "val_top1", "val_top5")


def _run(tmp_path, name, *extra):
    main([*ARGV, *extra, "--output", str(tmp_path / name)])
    return read_metrics(tmp_path / name)[0]


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_transmix_matches_eager(tmp_path, capsys, backend):
    eager = _run(tmp_path, "eager")
    capsys.readouterr()
    compiled = _run(tmp_path, backend, "--compile", "--compile-backend", backend)
    out = capsys.readouterr().err  # the log (stderr)
    assert "--compile: " in out and f"({backend})" in out, "the run did not compile"
    for field in COMPARED:
        assert float(compiled[field]) == pytest.approx(float(eager[field]), rel=1e-4, abs=1e-5), field
    # A stale or missing attention would change the targets, hence the loss: check that it can.
    other_source = _run(tmp_path, "rollout", "--attn-source", "0")
    assert float(other_source["train_loss"]) != pytest.approx(float(eager["train_loss"]), rel=1e-6)
