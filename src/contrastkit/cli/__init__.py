"""The ``contrastkit`` command.

    contrastkit train [--config run.yaml] [flags]        fine-tune a text embedding model (the main job)
    contrastkit mine ...                                 mine hard negatives from a corpus
    contrastkit eval MODEL --data DIR                    retrieval / STS evaluation
    contrastkit bench loss|step|train|dev                side-by-side benchmarks, dev sweeps

Each subcommand lives in its own module ``contrastkit.cli.<name>`` with
``add_arguments(parser)`` and ``run(args) -> int``; ``bench`` takes its
benchmarks from :data:`contrastkit.bench.BENCHMARKS`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from .. import __version__
from ..bench import BENCHMARKS

# subcommand name -> module with add_arguments(parser) and run(args)
COMMANDS = {
    "train": "contrastkit.cli.train",
    "mine": "contrastkit.cli.mine",
    "eval": "contrastkit.cli.eval",
    "report": "contrastkit.cli.report",
}


def _load(module_name: str):
    """Import a subcommand module; a module not written yet is skipped (not an error)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="contrastkit", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"contrastkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_name in COMMANDS.items():
        module = _load(module_name)
        if module is None:
            continue
        p = sub.add_parser(name, help=(module.__doc__ or name).strip().splitlines()[0],
                           description=(module.__doc__ or name).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    bench = sub.add_parser("bench", help="run a benchmark (side by side with the naive formula and peers)")
    bench_sub = bench.add_subparsers(dest="benchmark", required=True)
    for name, module_name in BENCHMARKS.items():
        module = _load(module_name)
        if module is None:
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
