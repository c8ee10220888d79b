"""Checkpoints: atomic writes, newest-first discovery, and loading with ``weights_only=True``.

A checkpoint is a plain dict of tensors and Python containers (no pickled objects), so that it loads
with ``torch.load(..., weights_only=True)``:

    model      the method's state_dict: student, teacher, queue and its pointer, BN statistics
    optimizer  the optimiser's state_dict
    scaler     the GradScaler's state_dict (fp16 only; empty otherwise)
    step       optimiser steps done; epoch: the epoch the next step belongs to
    world_size, images_per_step   processes, and images per optimiser step over all of them
    rng        {"torch", "numpy", "python", "cuda" (list, one per device), "region"} generator states
    config     the run's config as a nested dict
    stats      counters (skipped non-finite steps, ...)

Files are ``<run>/checkpoints/step_<NNNNNNNN>.pt``. A write goes to a temporary file in the same
folder, is flushed to disk, then renamed over the final name (``os.replace`` is atomic on POSIX), so
a crash at any moment leaves either the previous checkpoint set or the new one, never a torn file.
"""
from __future__ import annotations

import os
import random
import re
import tempfile
import time

import numpy as np
import torch

_NAME = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"step_{step:08d}.pt")


def atomic_save(obj, path: str):
    """torch.save(obj) to `path` atomically: temp file in the same folder, fsync, os.replace."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    # Make the rename itself durable.
    try:
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """[(step, path)] of the run's complete checkpoints, oldest first (temporary files ignored)."""
    folder = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    out = []
    for name in os.listdir(folder):
        m = _NAME.match(name)
        if m:
            out.append((int(m.group(1)), os.path.join(folder, name)))
    return sorted(out)


def latest_checkpoint(run_dir: str) -> str | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def prune_checkpoints(run_dir: str, keep: int):
    """Deletes all but the newest `keep` checkpoints."""
    if keep <= 0:
        return
    for _, path in list_checkpoints(run_dir)[:-keep]:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def set_aside_later(run_dir: str, step: int) -> tuple[str | None, list[int]]:
    """Moves the run's checkpoints of steps after `step` into ``checkpoints/superseded-<time>/``
    (out of --resume's sight, not deleted), so that a run resumed from an earlier checkpoint goes
    on from there and a later ``--resume auto`` does not jump back to the abandoned steps.
    Returns (that folder or None, the steps moved)."""
    later = [(s, path) for s, path in list_checkpoints(run_dir) if s > step]
    if not later:
        return None, []
    folder = os.path.join(run_dir, "checkpoints", time.strftime("superseded-%Y%m%d-%H%M%S"))
    os.makedirs(folder, exist_ok=True)
    for _, path in later:
        os.replace(path, os.path.join(folder, os.path.basename(path)))
    return folder, [s for s, _ in later]


def remove_temporaries(run_dir: str) -> int:
    """Deletes the temporary files of saves that never finished (a process killed while saving);
    returns how many. Only the process that writes checkpoints may call it."""
    folder = os.path.join(run_dir, "checkpoints")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    stale = [n for n in names if n.startswith(".step_") and n.endswith(".tmp")]
    for name in stale:
        try:
            os.unlink(os.path.join(folder, name))
        except FileNotFoundError:
            pass
    return len(stale)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Loads a checkpoint with weights_only=True; a clear error if it is missing or unreadable."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001  (torch raises several types for torn or foreign files)
        from d3ssl.cli import torch_load_problem
        raise RuntimeError(f"could not load checkpoint {path!r}: {torch_load_problem(path, e)}") from e


# ----------------------------------------------------------------------------- RNG state

def rng_state(region_generator: torch.Generator | None = None) -> dict:
    """Every random generator the run draws from, as tensors and plain containers."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": _python_state_to_plain(random.getstate()),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if region_generator is not None:
        state["region"] = region_generator.get_state()
    return state


def set_rng_state(state: dict, region_generator: torch.Generator | None = None):
    """Restores what :func:`rng_state` saved. The states may come from a checkpoint loaded onto a
    GPU (map_location): torch takes generator states as CPU byte tensors only."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached"]))
    random.setstate(_python_state_from_plain(state["python"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    if region_generator is not None and "region" in state:
        region_generator.set_state(state["region"].cpu())


def _python_state_to_plain(st):
    version, internal, gauss = st
    return {"version": version, "internal": list(internal), "gauss": gauss}


def _python_state_from_plain(d):
    return (d["version"], tuple(d["internal"]), d["gauss"])
