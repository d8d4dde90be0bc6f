"""Training: the validated run config, the shared loop, atomic checkpoints, the run folder.

Recipes (:mod:`contrastkit.recipes`) wire data, model and objective into
:class:`~contrastkit.training.loop.Trainer`; ``contrastkit train`` runs them.
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .config import ConfigError, RunConfig, dump_config, load_config
from .loop import Trainer, TrainResult, build_schedule
from .run_folder import RunFolder, RunFolderError

__all__ = ["ConfigError", "RunConfig", "load_config", "dump_config", "Trainer", "TrainResult", "build_schedule",
           "RunFolder", "RunFolderError", "save_checkpoint", "load_checkpoint"]
