"""Atomic, resumable checkpoints: weights in safetensors, the rest loaded weights-only.

A checkpoint folder holds ``model.safetensors`` (every trainable module's state, keys
prefixed by its name), ``trainer.pt`` (optimizer, scheduler, sampler position, step,
epoch and the RNG states of python, numpy and torch), loaded with
``torch.load(weights_only=True)``. The folder is built aside and renamed into place, so
an interrupted write leaves the previous checkpoint intact. Resuming from it gives the
same final weights as an uninterrupted run.

Example::

    import tempfile, torch
    from contrastkit.training.checkpoint import save_checkpoint, load_checkpoint
    net = torch.nn.Linear(3, 2); opt = torch.optim.AdamW(net.parameters())
    folder = tempfile.mkdtemp() + "/ckpt"
    save_checkpoint(folder, modules={"model": net}, state={"optimizer": opt.state_dict(), "step": 5})
    state = load_checkpoint(folder, modules={"model": net})
    assert state["step"] == 5
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Dict, Mapping, Union

import torch
from torch import nn

from .run_folder import atomic_replace_dir

__all__ = ["save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state"]


def rng_state() -> Dict[str, Any]:
    """The RNG states of python, numpy and torch (CPU and every CUDA device), as tensors
    and plain containers that ``torch.load(weights_only=True)`` accepts."""
    import numpy as np

    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    out: Dict[str, Any] = {
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss),
                  float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal.tolist()), gauss))
    name, keys, pos, has_gauss, g = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(g)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Union[str, Path], *, modules: Mapping[str, nn.Module], state: Mapping[str, Any]) -> None:
    """Write ``modules`` (safetensors) and ``state`` (optimizer, scheduler, counters...)
    plus the RNG states into ``folder``, atomically."""
    from safetensors.torch import save_file

    tensors: Dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"{name}.{key}"] = value.detach().to("cpu").contiguous()
    # tied weights share storage: safetensors refuses shared tensors, so clone them
    seen: Dict[int, str] = {}
    for key, value in list(tensors.items()):
        ptr = value.untyped_storage().data_ptr()
        if ptr in seen:
            tensors[key] = value.clone()
        seen[ptr] = key
    payload = {**dict(state), "rng": rng_state()}

    def build(tmp: Path) -> None:
        save_file(tensors, str(tmp / "model.safetensors"))
        torch.save(payload, tmp / "trainer.pt")

    atomic_replace_dir(build, Path(folder))


def load_checkpoint(folder: Union[str, Path], *, modules: Mapping[str, nn.Module],
                    restore_rng: bool = True) -> Dict[str, Any]:
    """Load ``modules``' weights from ``folder`` (strict: a missing or unexpected key is an
    error) and return the saved state; the RNG states are restored unless asked not to."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "model.safetensors").is_file() or not (folder / "trainer.pt").is_file():
        raise FileNotFoundError(f"{folder} is not a checkpoint (needs model.safetensors and trainer.pt)")
    tensors = load_file(str(folder / "model.safetensors"))
    for name, module in modules.items():
        prefix = f"{name}."
        sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        own = module.state_dict()
        shapes = [f"{k}: {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} in the model"
                  for k, v in sub.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
        if shapes:
            raise ValueError(f"checkpoint {folder} does not match module {name!r}: " + "; ".join(shapes[:3]))
        missing, unexpected = module.load_state_dict(sub, strict=False)
        if missing or unexpected:
            raise ValueError(f"checkpoint {folder} does not match module {name!r}: missing {list(missing)[:5]}, "
                             f"unexpected {list(unexpected)[:5]}")
    state = torch.load(folder / "trainer.pt", weights_only=True, map_location="cpu")
    if restore_rng and "rng" in state:
        set_rng_state(state["rng"])
    return state
