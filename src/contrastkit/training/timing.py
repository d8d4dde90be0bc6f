"""Wall time per phase of a run, logged as it happens and summed for ``metrics.json``.

Example::

    from contrastkit.training.timing import PhaseTimer
    timer = PhaseTimer()
    with timer("encode_corpus"):
        pass
    assert "encode_corpus" in timer.seconds
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Dict, Optional

__all__ = ["PhaseTimer"]


class PhaseTimer:
    """``with timer("name"): ...`` adds the block's wall seconds to ``seconds["name"]`` and
    calls ``on_phase(name, seconds)`` (e.g. to log a metrics.jsonl record)."""

    def __init__(self, on_phase: Optional[Callable[[str, float], None]] = None) -> None:
        self.seconds: Dict[str, float] = {}
        self.on_phase = on_phase
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.seconds[name] = round(self.seconds.get(name, 0.0) + dt, 3)
            if self.on_phase is not None:
                self.on_phase(name, dt)

    def total(self) -> float:
        return time.perf_counter() - self.start
