"""Training checkpoints: written atomically, pruned to a limit, loaded without pickle.

A checkpoint is `<run>/checkpoints/checkpoint-<step>.pt`, holding model, EMA, optimizer,
LR scheduler, step and RNG states. It is written to a temporary file and renamed, so a
process killed mid-write never leaves a file that `latest` would pick.
"""
from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import torch

from training_utils import UserError, atomic_write

PATTERN = re.compile(r"checkpoint-(\d+)\.pt$")


def checkpoint_step(path: Path) -> int:
    """The training step a checkpoint file was saved at."""
    return int(PATTERN.search(path.name).group(1))


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    found = [p for p in folder.glob("checkpoint-*.pt") if PATTERN.search(p.name)] if folder.is_dir() else []
    return sorted(found, key=checkpoint_step)


def resolve_checkpoint(run_dir: str | Path, which: str, required: bool = True) -> Path | None:
    """`latest` (the newest complete checkpoint of run_dir) or an explicit path.

    With required=False, `latest` in a run that has no checkpoint yet gives None.
    """
    if which == "latest":
        found = list_checkpoints(run_dir)
        if not found and required:
            raise UserError(f"no checkpoint in {Path(run_dir) / 'checkpoints'}")
        return found[-1] if found else None
    path = Path(which)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    return path


def save_checkpoint(run_dir: str | Path, state: dict, step: int, total_limit: int | None = None) -> Path:
    path = Path(run_dir) / "checkpoints" / f"checkpoint-{step:08d}.pt"
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    if total_limit:
        for old in list_checkpoints(run_dir)[:-total_limit]:
            old.unlink()
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for a truncated or foreign file
        raise UserError(f"cannot read checkpoint {path}: {str(err).splitlines()[0]}") from None


def rng_state() -> dict:
    """Python, numpy, torch and CUDA generator states, in types weights_only loading accepts."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "cached": cached},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
