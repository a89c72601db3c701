"""transmix-train: the DeiT-recipe trainer built on timm and transmix-kernels.

Console commands: ``transmix-train`` (train / evaluate, :mod:`transmix_train.main`),
``transmix-visualize`` (the paper's Figure 1 for a checkpoint) and ``transmix-experiment`` (the
supplementary's comparison tables). The kernel library ``transmix_kernels`` holds no training code.
"""

__all__: list[str] = []
