"""A cell's checkpoint file: what identifies it, how it is written and read, the RNG states.

A checkpoint is one ``torch.save`` file holding a dict: ``identity`` (see :func:`identity`) and
whatever the training loop put in it. It is written to a temporary file in the same directory,
flushed, fsynced and renamed (then the directory is fsynced), so a reader finds either the old
complete file or the new complete one, even after SIGKILL or a power cut. It is read with
``weights_only=True``: tensors, numbers, strings and containers only, never arbitrary objects.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from estbench.spec import Cell, Measure
from estbench.store import atomic_replace

__all__ = ["CheckpointWarning", "identity", "save_checkpoint", "load_checkpoint",
           "rng_states", "restore_rng_states"]

#: bumped whenever the layout of a checkpoint changes; older files are then ignored
FORMAT = 1


class CheckpointWarning(UserWarning):
    """A checkpoint file was found but not used (unreadable, or another cell's)."""


def identity(cell: Cell, measure: Measure, device: torch.device) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the cell (task, estimator, their parameters,
    seed), a hash of the measure (less the keys that cannot change the numbers, such as
    ``checkpoint_every`` and ``time_limit_s``: see :meth:`Measure.identity`), the device, the
    torch version and the file format."""
    measure_hash = hashlib.sha256(json.dumps(measure.identity(), sort_keys=True).encode()
                                  ).hexdigest()
    key = json.dumps([cell.task, cell.task_params, cell.estimator, cell.estimator_params,
                      cell.seed], sort_keys=True)
    return {"format": FORMAT, "cell": cell.id, "key": key, "measure": measure_hash,
            "device": str(device), "torch": str(torch.__version__)}


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically and durably (temp file, fsync, rename), and
    remove temporary files that a killed save of the same path left behind."""
    path = Path(path)
    atomic_replace(path, lambda handle: torch.save(payload, handle))
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a save that was killed
        stale.unlink(missing_ok=True)


def load_checkpoint(path: Path, expected: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it exists, can be read and matches ``expected`` (an
    :func:`identity`); otherwise ``None``, with a :class:`CheckpointWarning` when a file was
    there but is not used."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location=None, weights_only=True)
    except Exception as err:  # any failure to read means the file cannot be resumed from
        reason = _first_error_line(err)
        warnings.warn(f"checkpoint {path} is unreadable ({reason}); the cell starts over",
                      CheckpointWarning, stacklevel=2)
        return None
    found = payload.get("identity") if isinstance(payload, dict) else None
    if found != expected:
        differs = sorted(k for k in expected if not isinstance(found, dict)
                         or found.get(k) != expected[k])
        warnings.warn(f"checkpoint {path} belongs to another cell or setting (differs in: "
                      f"{', '.join(differs)}); the cell starts over", CheckpointWarning,
                      stacklevel=2)
        return None
    return payload


def _first_error_line(err: Exception) -> str:
    """The line of an error message that names the problem (torch's load errors start with
    advice and put the cause on a later line)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    causes = [line for line in lines if "error" in line.lower()]
    return (causes or lines or [type(err).__name__])[0]


def rng_states(generators: dict[str, torch.Generator], device: torch.device) -> dict[str, Any]:
    """Every random state a cell draws from: torch's global CPU generator, the CUDA generator of
    ``device`` when it is a GPU, and each named generator."""
    states: dict[str, Any] = {"torch": torch.get_rng_state(),
                              "generators": {k: g.get_state() for k, g in generators.items()}}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng_states(states: dict[str, Any], generators: dict[str, torch.Generator],
                       device: torch.device) -> None:
    """Put back what :func:`rng_states` returned."""
    torch.set_rng_state(states["torch"])
    for name, generator in generators.items():
        generator.set_state(states["generators"][name])
    if device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)
