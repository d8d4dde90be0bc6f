"""Integrations with other training frameworks (imported on demand, so that
``import contrastkit`` does not import them).

- :mod:`contrastkit.integrations.sentence_transformers`: :class:`CachedLoss`, any
  contrastkit column objective as a ``SentenceTransformerTrainer`` loss, tiled and
  gradient-cached through :meth:`contrastkit.scale.GradCache.embed`.

Example::

    from contrastkit.integrations.sentence_transformers import CachedLoss
"""

__all__ = ["sentence_transformers"]
