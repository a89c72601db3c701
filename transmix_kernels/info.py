"""``python -m transmix_kernels.info``: versions, backends and build settings, for bug reports.

The report itself is :func:`transmix_kernels.info` (implemented in ``_info.py``).
"""

import sys

from ._info import main

if __name__ == "__main__":
    sys.exit(main())
