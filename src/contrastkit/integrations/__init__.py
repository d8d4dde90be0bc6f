"""Integrations with other training frameworks (imported on demand, so that
``import contrastkit`` imports neither sentence-transformers nor Lightning).

- :mod:`contrastkit.integrations.sentence_transformers`: :class:`CachedLoss`, any
  contrastkit column objective as a ``SentenceTransformerTrainer`` loss, tiled and
  gradient-cached through :meth:`contrastkit.scale.GradCache.embed`.
- :mod:`contrastkit.integrations.lightning`: :class:`ContrastiveModule`, a
  ``LightningModule`` whose ``training_step`` returns a gradient-cached loss.
- :mod:`contrastkit.integrations.columns`: :func:`call_with_columns`, how dataset columns
  (anchor, positive, negatives...) reach an objective.

Example::

    from contrastkit.integrations.sentence_transformers import CachedLoss
"""

__all__ = ["columns", "sentence_transformers", "lightning"]
