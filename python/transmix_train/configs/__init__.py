"""YAML configs of ``transmix-train`` (keys are flag names with underscores) and, in ``grids/``, the
grids of ``transmix-experiment``: package data of ``transmix_train``, so the default config and the
built-in grids are found in any install."""

__all__: list[str] = []
