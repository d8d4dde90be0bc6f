"""The run folder: where a run writes everything, and the rules that protect it.

Layout (``contrastkit train --output DIR``)::

    DIR/.contrastkit-run   the marker: this folder was made by a run (what --overwrite checks)
    DIR/config.yaml        the resolved configuration (repeatable)
    DIR/metrics.jsonl      one JSON record per evaluation / phase, appended as they happen
    DIR/metrics.json       the summary: before / after, intervals, wall time per phase
    DIR/checkpoint/        the latest training state (atomic; what --resume reads)
    DIR/best/              the best model by the dev metric (sentence-transformers layout)
    DIR/model/             the final model (sentence-transformers layout, safetensors)
    DIR/report.html        the before / after report with its figures

A folder that already holds a run is never overwritten unless asked (``overwrite``) and
is continued only when asked (``resume``). ``overwrite`` replaces only a run folder (the
marker, or the ``config.yaml`` + ``metrics.jsonl`` of a run made before the marker) or an
empty folder, never a repository, the working or home folder, or a folder holding a path
it is told to protect (the run's data and model). A run that stops before it has anything
worth keeping removes what it wrote (:meth:`RunFolder.discard_if_unstarted`). Every file
is written atomically (a temporary file in the same folder, then ``os.replace``), so a
crash never leaves half a file.

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
from typing import Any, Dict, List, Mapping, Optional, Union

__all__ = ["RunFolder", "RunFolderError", "atomic_write_text", "atomic_replace_dir", "default_run_dir",
           "is_run_folder", "MARKER"]

# The file a run writes first into its folder: the proof that --overwrite may replace it.
MARKER = ".contrastkit-run"
# What a run that never got past its start holds (all written by the run itself).
_UNSTARTED = frozenset({MARKER, "config.yaml", "metrics.jsonl"})


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


def is_run_folder(path: Union[str, Path]) -> bool:
    """True when ``path`` is a folder made by a run: it holds the marker, or (a run made
    before the marker) a ``config.yaml`` of a run configuration and a ``metrics.jsonl``."""
    p = Path(path)
    if (p / MARKER).is_file():
        return True
    if not ((p / "config.yaml").is_file() and (p / "metrics.jsonl").is_file()):
        return False
    import yaml

    try:
        saved = yaml.safe_load((p / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(saved, dict) and {"recipe", "model", "output"} <= set(saved)


def _inside(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _why_not_replace(p: Path, protect: Mapping[str, Any]) -> Optional[str]:
    """Why ``--overwrite`` must not delete ``p`` (None when it may)."""
    real = p.resolve()
    if (p / ".git").exists():
        return "it holds .git (a repository), not a run"
    for name, where in (("the current folder", Path.cwd()), ("your home folder", Path.home())):
        if _inside(where.resolve(), real):
            return f"it is or holds {name}"
    for field_name, value in protect.items():
        if value and Path(str(value)).exists() and _inside(Path(str(value)).resolve(), real):
            return (f"{field_name} ({value}) lies inside it and would be deleted; choose another --output "
                    "(or move the data out)")
    if not is_run_folder(p):
        return (f"it is not a contrastkit run folder (no {MARKER} marker, nor the config.yaml + metrics.jsonl "
                "of a run), and --overwrite replaces only run folders; choose another --output, or remove "
                "the folder yourself if you mean to")
    return None


class RunFolder:
    """A run's folder (see the module doc). Use :meth:`create` to open one."""

    def __init__(self, path: Union[str, Path], *, is_main: bool = True) -> None:
        self.path = Path(path)
        self.is_main = is_main
        self._fresh = False          # create() started a new run here (the folder held nothing of value)
        self._made_folder = False    # create() made the folder itself

    @classmethod
    def create(cls, path: Union[str, Path], *, overwrite: bool = False, resume: bool = False,
               is_main: bool = True, protect: Optional[Mapping[str, Any]] = None) -> "RunFolder":
        """Open ``path`` for a new run (it must not hold anything unless ``overwrite``) or,
        with ``resume``, for continuing the run it holds (its checkpoint must exist).

        ``overwrite`` replaces only a run folder (:func:`is_run_folder`), never a repository,
        the working or home folder, or a folder holding one of the paths of ``protect``
        (``{"data.source": ..., "model.name": ...}``; names that are no existing path are
        skipped). A new run's folder gets the marker file first."""
        p = Path(path)
        if overwrite and resume:
            raise RunFolderError("choose either overwrite (start again) or resume (continue), not both")
        if p.exists() and not p.is_dir():
            raise RunFolderError(f"run folder {p} is a file, not a folder; choose another --output")
        # a folder holding only the marker is a new run's (the main process may have just made it)
        holds = p.is_dir() and any(e.name != MARKER for e in p.iterdir())
        if resume:
            if not (p / "checkpoint").is_dir():
                raise RunFolderError(f"cannot resume: {p} has no checkpoint/ (start a new run without --resume)")
        elif holds and is_main:  # the main process decides (the others may look after it has written)
            if not overwrite:
                if is_run_folder(p):
                    raise RunFolderError(f"run folder {p} already holds a run; pass --overwrite to replace it, "
                                         "--resume to continue it, or choose another --output")
                raise RunFolderError(f"{p} already exists and is not empty, and it is not a contrastkit run folder; "
                                     "choose another --output (--overwrite replaces only run folders)")
            why = _why_not_replace(p, protect or {})
            if why:
                raise RunFolderError(f"refusing to overwrite {p}: {why}")
            shutil.rmtree(p)
        run = cls(p, is_main=is_main)
        if is_main:
            run._made_folder = not p.exists()
            p.mkdir(parents=True, exist_ok=True)
            if not resume:
                run._fresh = True
                atomic_write_text(p / MARKER, "This folder holds a contrastkit run; `contrastkit train "
                                              "--overwrite` may replace it.\n")
        return run

    def discard_if_unstarted(self) -> bool:
        """After a run that stopped early: when :meth:`create` started it here and the
        folder holds nothing but what the run wrote before it had anything worth keeping
        (the marker, ``config.yaml``, ``metrics.jsonl``; no checkpoint, no model), remove
        those files, and the folder when :meth:`create` made it. True when removed, so
        that the same command can simply be run again."""
        if not (self.is_main and self._fresh and self.path.is_dir()):
            return False
        entries = list(self.path.iterdir())
        if not all(e.name in _UNSTARTED and e.is_file() for e in entries):
            return False
        for e in entries:
            e.unlink()
        if self._made_folder:
            try:
                self.path.rmdir()
            except OSError:
                pass
        return True

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
