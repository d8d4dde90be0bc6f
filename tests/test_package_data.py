"""The bundled SciFact and STS-B ship inside the wheel and work from an installed copy (no clone)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = [
    "bundled/README.md",
    "bundled/scifact/corpus.jsonl.gz",
    "bundled/scifact/queries.jsonl",
    "bundled/scifact/qrels/train.tsv",
    "bundled/scifact/qrels/test.tsv",
    "bundled/scifact/LICENSE.md",
    "bundled/stsbenchmark/sts-train.csv",
    "bundled/stsbenchmark/sts-dev.csv",
    "bundled/stsbenchmark/sts-test.csv",
    "bundled/stsbenchmark/LICENSE.txt",
    "bundled/stsbenchmark/readme.txt",
]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build the wheel from a copy of the packaging inputs (the working tree is left untouched)."""
    src = tmp_path_factory.mktemp("project")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
    dist = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(dist), "."], cwd=src, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels = list(dist.glob("contrastkit-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_holds_bundled_data_and_licenses(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for rel in BUNDLED:
            assert f"contrastkit/{rel}" in names, f"{rel} missing from {wheel.name}"
            assert z.read(f"contrastkit/{rel}") == (ROOT / "src" / "contrastkit" / rel).read_bytes(), rel


def test_installed_copy_reads_bundled_data(wheel, tmp_path):
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    code = ("import contrastkit.data as d, pathlib, sys; "
            "p = d.data_dir(); ds = d.load_beir('scifact'); "
            "assert str(p).startswith(sys.argv[1]), p; "
            "assert len(ds.examples('train')) == 919 and len(ds.examples('test')) == 339; "
            "assert (p / 'stsbenchmark' / 'sts-test.csv').is_file(); print('ok')")
    env = {k: v for k, v in os.environ.items() if k not in ("CONTRASTKIT_DATA", "PYTHONPATH")}
    env["PYTHONPATH"] = str(site)
    proc = subprocess.run([sys.executable, "-c", code, str(site)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr
