"""Objectives: each loss is a thin spec on the engine (targets, weights, masks)."""
