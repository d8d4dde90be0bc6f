"""Benchmarks run by ``contrastkit bench NAME``: side-by-side measurements, never tests.

Each submodule has ``add_arguments(parser)`` and ``run(args) -> int``.
"""

BENCHMARKS = {
    "loss": "contrastkit.bench.loss",
    "step": "contrastkit.bench.step",
    "train": "contrastkit.bench.train",
    "dev": "contrastkit.bench.dev",
}
