"""Grids of ``transmix-experiment`` (``table1``, ``table2``, ``table3``, ``distill``) and the trainer
configs they name: package data, found by :func:`transmix_train.experiments.grid_dir`."""

__all__: list[str] = []
