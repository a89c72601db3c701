"""``python python/experiments.py GRID [flags]``: the same as ``transmix-experiment GRID [flags]``."""

from transmix_train.experiments import main

if __name__ == "__main__":
    main()
