"""Recipes: wiring only. Each turns a validated :class:`~contrastkit.training.config.RunConfig`
into data, model, objective and the shared training loop, and writes a run folder.

- ``text_retrieval`` (the main job): adapt a text embedding model to a corpus, with
  before / after evidence (:mod:`contrastkit.recipes.text_retrieval`).
"""

from typing import Any, Callable, Dict

__all__ = ["RECIPE_RUNNERS", "get_recipe"]

RECIPE_RUNNERS: Dict[str, str] = {
    "text_retrieval": "contrastkit.recipes.text_retrieval:run_text_retrieval",
    "simcse": "contrastkit.recipes.simcse:run_simcse",
}


def get_recipe(name: str) -> Callable[..., Any]:
    """The run function of recipe ``name`` (``run(cfg, run_folder) -> summary``)."""
    import importlib

    from ..training.config import ConfigError

    if name not in RECIPE_RUNNERS:
        raise ConfigError(f"recipe: {name!r} is not available; allowed values: {', '.join(RECIPE_RUNNERS)}")
    module, func = RECIPE_RUNNERS[name].split(":")
    return getattr(importlib.import_module(module), func)
