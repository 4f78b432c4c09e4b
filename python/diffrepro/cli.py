# SPDX-License-Identifier: Apache-2.0
"""The ``diffrepro`` command."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def _cmd_info(args) -> int:
    from . import build_info

    print(json.dumps(build_info(), indent=1))
    return 0


def _cmd_bench(args) -> int:
    from . import benchmarks

    rows = benchmarks.run_table(args.sizes, rounds=args.rounds)
    print(benchmarks.format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffrepro", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="what was built and which CPU/GPU paths run")
    s.set_defaults(fn=_cmd_info)

    s = sub.add_parser("bench", help="kernel throughput against the usual tools, on this machine")
    s.add_argument("--sizes", default="small", choices=["small", "paper"])
    s.add_argument("--rounds", type=int, default=5)
    s.add_argument("--json", help="also write the rows to this JSON file")
    s.set_defaults(fn=_cmd_bench)

    # Each workflow module registers its own sub-commands (imports flow cli -> workflows).
    from . import generate, score

    generate.add_commands(sub)
    score.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False  # SPEC §0: no TF32 in analytic GEMMs
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
