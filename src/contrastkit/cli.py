"""The ``contrastkit`` command.

    contrastkit bench loss [--large] [--objective NAME]   loss-engine benchmark
    contrastkit bench step                                end-to-end training-step benchmark
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from . import __version__
from .bench import BENCHMARKS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="contrastkit", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"contrastkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="run a benchmark (side by side with the naive formula and peers)")
    bench_sub = bench.add_subparsers(dest="benchmark", required=True)
    for name, module_name in BENCHMARKS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue
        p = bench_sub.add_parser(name, help=(module.__doc__ or name).strip().splitlines()[0])
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
