# SPDX-License-Identifier: Apache-2.0
"""The ``diffrepro`` command: parse, call the workflow, print.

One module per command group registers its sub-commands (``add_commands``) and holds thin
handlers; the science lives in :mod:`diffrepro.generation`, :mod:`diffrepro.metrics`,
:mod:`diffrepro.sweeps` and :mod:`diffrepro.sscd`. Building the parser imports no torch, so
``diffrepro --help`` is fast.
"""

from __future__ import annotations

import sys

from . import _common

__all__ = ["build_parser", "main"]


def _version() -> str:
    from .. import __version__

    return __version__


def build_parser() -> _common.ArgumentParser:
    from . import analysis, features, generate, inverse, score, selftest, tools

    p = _common.ArgumentParser(
        prog="diffrepro", formatter_class=_common.HelpFormatter,
        description="Theoretical generations with the empirical optimal and Gaussian denoisers, SSCD "
                    "descriptors and reproducibility/generalisation scores (Zhang et al., ICML 2024; "
                    "Li, Dai, Qu, NeurIPS 2024).")
    p.add_argument("--version", action="version", version=f"diffrepro {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (generate, features, score, analysis, tools, inverse, selftest):
        module.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (0 ok, 1 runtime failure, 2 usage error)."""
    args = build_parser().parse_args(argv)
    return _common.run(args)


if __name__ == "__main__":
    sys.exit(main())
