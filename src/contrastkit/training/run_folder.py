"""The run folder: where a run writes everything, and the rules that protect it.

Layout (``contrastkit train --output DIR``)::

    DIR/config.yaml        the resolved configuration (repeatable)
    DIR/metrics.jsonl      one JSON record per evaluation / phase, appended as they happen
    DIR/metrics.json       the summary: before / after, intervals, wall time per phase
    DIR/checkpoint/        the latest training state (atomic; what --resume reads)
    DIR/best/              the best model by the dev metric (sentence-transformers layout)
    DIR/model/             the final model (sentence-transformers layout, safetensors)
    DIR/report.html        the before / after report with its figures

A folder that already holds a run is never overwritten unless asked (``overwrite``) and
is continued only when asked (``resume``). Every file is written atomically (a temporary
file in the same folder, then ``os.replace``), so a crash never leaves half a file.

Example::

    import tempfile, os
    from contrastkit.training.run_folder import RunFolder
    run = RunFolder.create(os.path.join(tempfile.mkdtemp(), "run"))
    run.log({"phase": "dev", "step": 10, "ndcg@10": 0.71})
    run.write_json("metrics.json", {"after": {"ndcg@10": 0.71}})
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

__all__ = ["RunFolder", "RunFolderError", "atomic_write_text", "atomic_replace_dir", "default_run_dir"]


class RunFolderError(ValueError):
    """The run folder cannot be used as asked (exists without overwrite / resume, ...)."""


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_replace_dir(build, target: Path) -> None:
    """Build a folder with ``build(tmp_dir)`` and put it at ``target`` in one rename
    (the old folder, if any, is moved aside first and removed after the swap)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=str(target.parent)))
    try:
        build(tmp)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old.{os.getpid()}.{time.time_ns()}"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def default_run_dir(root: Union[str, Path] = "runs", name: str = "train") -> Path:
    """A fresh folder name under ``root``: ``runs/train-YYYYmmdd-HHMMSS[-n]``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{name}-{stamp}"
    p, n = base, 1
    while p.exists():
        n += 1
        p = Path(f"{base}-{n}")
    return p


class RunFolder:
    """A run's folder (see the module doc). Use :meth:`create` to open one."""

    def __init__(self, path: Union[str, Path], *, is_main: bool = True) -> None:
        self.path = Path(path)
        self.is_main = is_main

    @classmethod
    def create(cls, path: Union[str, Path], *, overwrite: bool = False, resume: bool = False,
               is_main: bool = True) -> "RunFolder":
        """Open ``path`` for a new run (it must not hold one unless ``overwrite``) or, with
        ``resume``, for continuing the run it holds (its checkpoint must exist)."""
        p = Path(path)
        if overwrite and resume:
            raise RunFolderError("choose either overwrite (start again) or resume (continue), not both")
        holds_run = p.is_dir() and any(p.iterdir())
        if resume:
            if not (p / "checkpoint").is_dir():
                raise RunFolderError(f"cannot resume: {p} has no checkpoint/ (start a new run without --resume)")
        elif holds_run:
            if not overwrite:
                raise RunFolderError(f"run folder {p} already exists and is not empty; pass --overwrite to replace "
                                     "it, --resume to continue it, or choose another --output")
            if is_main:
                if (p / ".git").exists() or p.resolve() in (Path.cwd().resolve(), Path.home().resolve()):
                    raise RunFolderError(f"refusing to overwrite {p}: it does not look like a run folder")
                shutil.rmtree(p)
        if is_main:
            p.mkdir(parents=True, exist_ok=True)
        return cls(p, is_main=is_main)

    def file(self, name: str) -> Path:
        return self.path / name

    def log(self, record: Dict[str, Any]) -> None:
        """Append one JSON record (with a timestamp) to ``metrics.jsonl``."""
        if not self.is_main:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=_json_default) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def records(self) -> List[Dict[str, Any]]:
        """The records of ``metrics.jsonl`` so far (empty when none)."""
        p = self.path / "metrics.jsonl"
        if not p.is_file():
            return []
        return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]

    def write_json(self, name: str, obj: Any) -> None:
        if self.is_main:
            atomic_write_text(self.path / name, json.dumps(obj, indent=2, default=_json_default) + "\n")

    def read_json(self, name: str) -> Optional[Any]:
        p = self.path / name
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")
