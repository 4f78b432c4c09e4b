# SPDX-License-Identifier: Apache-2.0
"""``python -m diffrepro`` (and ``torchrun -m diffrepro``) runs the ``diffrepro`` command."""

import sys

from .cli import main

sys.exit(main())
