"""Write (or rewrite) the report.html of a run folder.

    contrastkit report RUN_DIR                   -> RUN_DIR/report.html
    contrastkit report RUN_DIR --output r.html   -> r.html

The page is one self-contained HTML file (figures embedded, no network needed) drawn only
from the run's files: test metrics before -> after with the paired-bootstrap interval of
the difference, STS before -> after, the dev and loss curves, the interpolation curve,
the per-query differences, the mining statistics, the time per phase, the configuration.
See docs/report.md.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by `contrastkit train`")
    parser.add_argument("--output", "-o", default=None,
                        help="where to write the page (default: RUN_DIR/report.html)")


def run(args: argparse.Namespace) -> int:
    from ..diagnostics import write_report

    try:
        path = write_report(args.run_dir, output=args.output)
    except ValueError as err:
        print(f"contrastkit report: error: {err}", file=sys.stderr)
        return 2
    print(f"report written to {path}")
    return 0
