"""``torchrun ... python/train.py [flags]``: the same as ``transmix-train [flags]``."""

from transmix_train.main import main

if __name__ == "__main__":
    main()
