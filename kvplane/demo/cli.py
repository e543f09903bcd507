"""``kvplane demo`` (``make demo``): every seed flow end to end on loopback, then clean up."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from kvplane.errors import BadRequest

__all__ = ["add_parser"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="start a controller and two reference servers, run the seed flows, shut down",
    )
    p.add_argument(
        "--prefix-tokens",
        type=int,
        default=3000,
        help="length of the prefix the two completions share (default 3000, max ~3900)",
    )
    p.add_argument(
        "--no-controller",
        action="store_true",
        help="only the servers: skip the controller and its lookup/worker-info/clear steps",
    )
    p.add_argument(
        "--workdir", type=Path, default=None, help="where configs and logs go (default: temp)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvplane.demo.flow import DemoOptions, run_demo
    from kvplane.demo.output import Printer

    if not 256 <= args.prefix_tokens <= 3900:
        raise BadRequest("--prefix-tokens must lie in [256, 3900] (the servers' 4096-token limit)")
    out = Printer()
    with tempfile.TemporaryDirectory(prefix="kvplane-demo-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        out.block("kvplane demo: a controller and two reference servers on loopback")
        out.block(f"    configs and logs in {workdir}")
        options = DemoOptions(
            workdir=workdir,
            prefix_tokens=args.prefix_tokens,
            with_controller=not args.no_controller,
        )
        report = run_demo(options, out)
        out.step(
            f"done: TTFT {report.ttft_first_s * 1000:.0f} ms -> "
            f"{report.ttft_second_s * 1000:.0f} ms with {report.cached_tokens_second} "
            "cached tokens"
        )
    return 0
