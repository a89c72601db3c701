"""``python -m transmix_kernels.info``: versions, backends and build settings, for bug reports.

The report itself is :func:`transmix_kernels.info` (implemented in ``_info.py``).

Importing this module by name (``import transmix_kernels.info``) would make the import system set
the package attribute ``transmix_kernels.info`` to this module, hiding the function. So, when
imported, the module puts the function in its own place in ``sys.modules`` (a replacement the
import system honours): ``tk.info`` stays the function whichever import came first. Run with
``-m`` it is ``__main__`` and simply prints the report.
"""

from __future__ import annotations

import sys

from ._info import info, main

__all__ = ["info", "main"]

if __name__ == "__main__":
    sys.exit(main())
else:
    sys.modules[__name__] = info
