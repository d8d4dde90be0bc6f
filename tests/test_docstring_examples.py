"""Every ``Example::`` block of contrastkit's docstrings runs as written.

What is collected: the docstrings of every module of ``contrastkit`` (``contrastkit.__main__``
excepted), of the public classes and functions each module defines (not those it only
imports), and of the public (or dunder) methods, static/class methods and properties those
classes define in their own body. Each object is read once.

What a block is (reStructuredText literal block): a line ``Example::``, or
``Example (<a note, may span lines>)::``, then a blank line, then the lines indented
deeper than that header line (blank lines included). The block is dedented and run.

Conventions (a docstring that breaks them fails here):

- a block is self-contained: its imports included, small random inputs
  (``torch.randn``) instead of undefined ``queries``; where cheap it asserts its result;
- a block whose first line is ``# not run: <reason>`` is collected as a *skipped* case
  with that reason, which must say why (minutes of training, a whole corpus to encode,
  several processes, a GPU, the network...). ``pytest -rs`` lists them;
- a block whose first line starts with ``>>>`` is a doctest: it runs with
  :mod:`doctest` and its printed outputs are checked.

Each block is one test case named ``module:qualname`` (``module`` alone for a module
docstring; ``#2``, ``#3`` ... for later blocks of the same docstring). A block runs in a
fresh namespace, in a temporary working directory with ``tempfile`` pointed into it (so
nothing it writes lands in the repository), with the torch / numpy / random seeds at 0.
Keep examples small: the whole file runs in well under a minute on two CPU cores.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil
import random
import re
import tempfile
import textwrap
from typing import List, NamedTuple, Optional, Tuple

import numpy as np
import pytest
import torch

import contrastkit

HEADER = re.compile(r"^([ \t]*)Example(?:[ \t]*\([^()]*\))?::[ \t]*$", re.M)
SKIP = re.compile(r"^#\s*not run\b\s*:?\s*(.*)$")


class Block(NamedTuple):
    name: str
    header: str           # the ``Example[ (...)]::`` line(s)
    code: str
    skip: Optional[str]   # the reason when the block is marked ``# not run: ...``
    doctest: bool


def _documented(mod) -> list:
    """(qualname, object) for the module and what it defines, in a stable order."""
    out = [(None, mod)]
    for name, obj in sorted(vars(mod).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
            continue
        if inspect.isfunction(obj):
            out.append((obj.__qualname__, obj))
        elif inspect.isclass(obj):
            out.append((obj.__qualname__, obj))
            for attr, member in vars(obj).items():
                if attr.startswith("_") and not (attr.startswith("__") and attr.endswith("__")):
                    continue
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                elif isinstance(member, property):
                    member = member.fget
                if inspect.isfunction(member) and member.__module__ == mod.__name__:
                    out.append((f"{obj.__qualname__}.{attr}", member))
    return out


def _blocks_of(doc: str) -> List[Tuple[str, str]]:
    """``(header, code)`` of the literal blocks introduced by ``Example[ (...)]::`` in ``doc``."""
    lines = inspect.cleandoc(doc).splitlines()
    text = "\n".join(lines)
    out = []
    for m in HEADER.finditer(text):
        indent = len(m.group(1).expandtabs())
        start = text.count("\n", 0, m.end()) + 1
        body: List[str] = []
        for line in lines[start:]:
            if line.strip() and len(line) - len(line.lstrip()) <= indent:
                break
            body.append(line)
        out.append((" ".join(m.group(0).split()), textwrap.dedent("\n".join(body)).strip("\n") + "\n"))
    return out


def collect() -> List[Block]:
    blocks: List[Block] = []
    seen = set()
    for info in pkgutil.walk_packages(contrastkit.__path__, "contrastkit."):
        if info.name.split(".")[-1] == "__main__":
            continue
        mod = importlib.import_module(info.name)  # an import error is a collection error: loud
        for qualname, obj in _documented(mod):
            if id(obj) in seen or not obj.__doc__:
                continue
            seen.add(id(obj))
            base = mod.__name__ if qualname is None else f"{mod.__name__}:{qualname}"
            for n, (header, code) in enumerate(_blocks_of(obj.__doc__), start=1):
                name = base if n == 1 else f"{base}#{n}"
                first = code.lstrip().splitlines()[0].strip() if code.strip() else ""
                skip = SKIP.match(first)
                blocks.append(Block(name, header, code, skip.group(1).strip() if skip else None,
                                    first.startswith(">>>")))
    return blocks


BLOCKS = collect()


def test_collected():
    assert len(BLOCKS) >= 150, len(BLOCKS)
    assert len({b.name for b in BLOCKS}) == len(BLOCKS)
    assert [b.name for b in BLOCKS if not b.code.strip()] == []   # a header with no indented block


def test_skips_say_why():
    """An unrun example gives a reason a reader can check, in its first line (a note in
    the header, ``Example (not run ...)::``, would not stop it from running)."""
    assert [b.name for b in BLOCKS if b.skip is not None and len(b.skip) < 10] == []
    assert [b.name for b in BLOCKS if "not run" in b.header] == []


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A temporary working directory (and ``tempfile`` root) and RNGs seeded at 0; the RNG
    states and the torch settings an example could change are restored afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    threads, dtype, grad = torch.get_num_threads(), torch.get_default_dtype(), torch.is_grad_enabled()
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield tmp_path
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)
    torch.set_grad_enabled(grad)


@pytest.mark.parametrize(
    "block",
    [pytest.param(b, id=b.name, marks=[pytest.mark.skip(reason=f"{b.name}: not run: {b.skip}")] if b.skip is not None else [])
     for b in BLOCKS])
def test_example(block: Block, sandbox):
    if block.doctest:
        test = doctest.DocTestParser().get_doctest(block.code, {"__name__": "__example__"}, block.name,
                                                   block.name, 0)
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        out: List[str] = []
        runner.run(test, out=out.append)
        assert runner.failures == 0, "".join(out)
    else:
        exec(compile(block.code, block.name, "exec"), {"__name__": "__example__"})
