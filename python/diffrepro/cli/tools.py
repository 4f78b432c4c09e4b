# SPDX-License-Identifier: Apache-2.0
"""``diffrepro info`` and ``diffrepro bench``."""

from __future__ import annotations

from pathlib import Path

from ._common import HelpFormatter, int_at_least, refuse_overwrite, write_json


def add_commands(sub) -> None:
    s = sub.add_parser("info", help="what was built and which CPU/GPU paths run", formatter_class=HelpFormatter,
                       description="build_info(): version, CUDA build and runtime, CPU kernel path, GEMM engine.")
    s.set_defaults(fn=_cmd_info)

    s = sub.add_parser("bench", help="kernel throughput against the usual tools, on this machine",
                       formatter_class=HelpFormatter,
                       description="Times diffrepro's kernels and their peers (torch SDPA, chunked torch, faiss, "
                                   "the papers' code paths) side by side; prints the median, the spread "
                                   "(min-max over the rounds), each peer's time over diffrepro's, and each row as a "
                                   "percentage of this machine's measured FMA peak and read bandwidth.")
    s.add_argument("--sizes", default="small", choices=["small", "paper"], help="workload sizes")
    s.add_argument("--rounds", type=int_at_least(1), default=5, help="timed calls per implementation")
    s.add_argument("--json", metavar="OUT", help="also write the rows (and the peak) to this JSON file")
    s.add_argument("--peak", action="store_true",
                   help="only measure this machine's float32 FMA peak per vector width and its streaming-read "
                        "bandwidth (about two seconds); without it these lines head the table")
    s.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: each GPU engine against torch (chunked GEMM, SDPA) and faiss-gpu, with TFLOP/s and "
                        "fractions of the device's peaks (docs/cuda.md)")
    s.set_defaults(fn=_cmd_bench)


def _cmd_info(args) -> int:
    from .._backend import build_info
    from ..data import strict_json

    print(strict_json(build_info(), indent=1))
    return 0


def _cmd_bench(args) -> int:
    if args.device == "cuda":
        return _cmd_bench_cuda(args)
    from .. import benchmarks

    if args.json:
        refuse_overwrite(("--json", Path(args.json)))
    peak = benchmarks.machine_peak()
    print(benchmarks.format_peak(peak), flush=True)
    if args.peak:
        if args.json:
            write_json(Path(args.json), {"peak": peak})
        return 0
    rows = benchmarks.run_table(args.sizes, rounds=args.rounds)
    print(benchmarks.format_table(rows, peak))
    if args.json:
        write_json(Path(args.json), {"peak": peak, "rows": rows})
    return 0


def _cmd_bench_cuda(args) -> int:
    from .. import _gpu_dispatch, gpu_bench

    reason = _gpu_dispatch.cuda_skip_reason()
    if reason:
        print(f"diffrepro bench: skipped: {reason}")
        return 0
    table = gpu_bench.run_table(args.sizes, rounds=args.rounds)
    print(gpu_bench.format_table(table))
    if args.json:
        write_json(Path(args.json), table)
    return 0
