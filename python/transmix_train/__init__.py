"""transmix-train: the DeiT-recipe trainer built on timm and transmix-kernels.

Console commands: ``transmix-train`` (train / evaluate) and ``transmix-visualize`` (the paper's
Figure 1 for a checkpoint). The kernel library ``transmix_kernels`` holds no training code.
"""
