"""``python -m transmix_train.experiments GRID [flags]``: the same as ``transmix-experiment``."""

from .cli import main

__all__: list[str] = []

if __name__ == "__main__":
    main()
