"""Objectives: each loss is a thin spec on the engine (targets, weights, masks) with a
functional and a module face; :mod:`.base` holds what every module shares (the
temperature, the settings, the :class:`~contrastkit.objectives.base.Work` description)."""
