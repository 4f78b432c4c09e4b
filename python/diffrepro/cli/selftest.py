# SPDX-License-Identifier: Apache-2.0
"""``diffrepro selftest``: every engine of a device against the float64 oracle (pass/fail table)."""

from __future__ import annotations

import sys
from pathlib import Path

from ._common import HelpFormatter, write_json


def add_commands(sub) -> None:
    s = sub.add_parser(
        "selftest", help="check every kernel engine of a device against the float64 oracle",
        formatter_class=HelpFormatter,
        description="Runs each engine (CUDA: fused kernels per tile configuration, BLAS engine with float32, "
                    "3xTF32 and 3xBF16 products; CPU: the CPU path and the BLAS engine) on small real-data "
                    "shapes and on the papers' sizes, checks each result against the float64 oracle under "
                    "the tolerance rule and prints a pass/fail table. Exit status 1 if any check fails; "
                    "without a CUDA device, --device cuda prints 'skipped' and exits 0.")
    s.add_argument("--device", choices=["cuda", "cpu"], default=None,
                   help="engines of this device (default: cuda where a CUDA device and the CUDA build are "
                        "present, else cpu)")
    s.add_argument("--sizes", choices=["small", "paper", "all"], default=None,
                   help="shapes (default: all on cuda, small on cpu, where the papers' sizes take minutes)")
    s.add_argument("--json", metavar="OUT", help="also write the rows, build_info() and the engine report here")
    s.set_defaults(fn=_cmd_selftest)


def _cmd_selftest(args) -> int:
    from .. import _engine, _gpu_dispatch, selftest
    from .._backend import build_info

    if args.device is None:  # the devices present
        args.device = "cpu" if _gpu_dispatch.cuda_skip_reason() else "cuda"
    sizes = args.sizes or ("all" if args.device == "cuda" else "small")
    reason = _gpu_dispatch.cuda_skip_reason() if args.device == "cuda" else None
    if reason:
        print(f"diffrepro selftest: skipped: {reason}")
        if args.json:
            write_json(Path(args.json), {"status": "skipped", "reason": reason, "build_info": build_info()})
        return 0
    progress = (lambda s: print(f"  {s}", file=sys.stderr)) if sys.stderr.isatty() else (lambda s: None)
    rows = selftest.run(args.device, sizes, progress=progress)
    print(selftest.format_table(rows))
    bad = selftest.failed(rows)
    if args.json:
        write_json(Path(args.json), {"status": "failed" if bad else "passed", "device": args.device, "sizes": sizes,
                                     "rows": selftest.as_json(rows), "build_info": build_info(),
                                     "engines": _engine.report()})
    return 1 if bad else 0
