"""The results table: one pyarrow schema, atomic per-cell parquet files, loading.

A run directory holds ``spec.toml``, ``manifest.json``, ``cells/<cell>.parquet`` (one per finished
cell) and ``errors/<cell>.txt`` (one per failed cell). Files are written to a temporary name in the
same directory and renamed, so a reader never sees a half-written file, with the mode
``0o666 & ~umask`` that an ordinary ``open`` would give. A cell file carries its cell id and run
in its parquet metadata, and the manifest records its SHA-256: readers use only the files that the
manifest vouches for.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from estbench.errors import EstbenchError

__all__ = [
    "SCHEMA",
    "PHASES",
    "validate",
    "write_cell",
    "load_results",
    "atomic_write_text",
    "atomic_replace",
    "cell_path",
    "error_path",
    "checkpoint_path",
    "read_manifest",
    "cell_problem",
    "verified_cells",
    "file_digest",
    "ResultsWarning",
]

PHASES = ("gradient", "train", "eval", "throughput")

SCHEMA = pa.schema(
    [
        pa.field("run", pa.string(), nullable=False),
        pa.field("cell", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("task_version", pa.string(), nullable=False),
        pa.field("task_params", pa.string(), nullable=False),
        pa.field("estimator", pa.string(), nullable=False),
        pa.field("estimator_params", pa.string(), nullable=False),
        pa.field("estimator_label", pa.string(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("device", pa.string(), nullable=False),
        pa.field("phase", pa.string(), nullable=False),
        pa.field("step", pa.int64(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("value", pa.float64(), nullable=False),
        pa.field("ci_low", pa.float64(), nullable=True),
        pa.field("ci_high", pa.float64(), nullable=True),
        pa.field("package_version", pa.string(), nullable=False),
        pa.field("git_sha", pa.string(), nullable=False),
        pa.field("torch_version", pa.string(), nullable=False),
        pa.field("device_name", pa.string(), nullable=False),
        pa.field("timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)


def validate(rows: pd.DataFrame) -> pa.Table:
    """Check ``rows`` against :data:`SCHEMA` and return it as an arrow table."""
    missing = [name for name in SCHEMA.names if name not in rows.columns]
    extra = [name for name in rows.columns if name not in SCHEMA.names]
    if missing or extra:
        raise EstbenchError(f"results rows do not match the schema: missing {missing}, extra {extra}")
    bad_phase = set(rows["phase"]) - set(PHASES)
    if bad_phase:
        raise EstbenchError(f"results rows have unknown phases {sorted(bad_phase)}; known: {PHASES}")
    for field in SCHEMA:
        if pa.types.is_floating(field.type) or field.nullable:
            continue  # NaN is a legitimate float value (an undefined metric)
        name = field.name
        if rows[name].isna().any():
            raise EstbenchError(f"results column '{name}' has missing values")
    try:
        table = pa.Table.from_pandas(rows[SCHEMA.names], schema=SCHEMA, preserve_index=False)
    except (pa.ArrowException, ValueError, TypeError) as err:
        raise EstbenchError(f"results rows do not fit the schema: {err}") from None
    table.validate(full=True)
    return table


class ResultsWarning(UserWarning):
    """Files of a run directory that were left out of the results, and why."""


def _umask() -> int:
    """The process umask, read without changing it where /proc allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # pragma: no cover - not Linux
    os.umask(mask)
    return mask


def atomic_replace(path: Path, write: Any) -> None:
    """Write ``path`` through ``write(handle)`` on a temporary file in the same directory, fsync
    and rename, so that a reader never sees a half-written file; mode as ``open`` gives."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    atomic_replace(Path(path), lambda handle: handle.write(text.encode()))


def cell_path(run_dir: Path, cell_id: str) -> Path:
    return Path(run_dir) / "cells" / f"{cell_id}.parquet"


def error_path(run_dir: Path, cell_id: str) -> Path:
    return Path(run_dir) / "errors" / f"{cell_id}.txt"


def checkpoint_path(run_dir: Path, cell_id: str) -> Path:
    """Where a running cell keeps its state between steps (removed once the cell is written)."""
    return Path(run_dir) / "checkpoints" / f"{cell_id}.pt"


def write_cell(rows: pd.DataFrame, path: Path, identity: dict[str, str] | None = None) -> str:
    """Validate ``rows`` and write them atomically as one parquet file whose metadata holds
    ``identity`` (e.g. ``{"cell": ..., "run": ...}``); returns the file's SHA-256."""
    table = validate(rows)
    if identity:
        table = table.replace_schema_metadata(
            {f"estbench.{key}": value for key, value in identity.items()})
    atomic_replace(Path(path), lambda handle: pq.write_table(table, handle))
    return file_digest(path)


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cell_problem(run_dir: Path, cell_id: str, record: dict[str, Any]) -> str | None:
    """Why the file of a cell recorded as done cannot be trusted, or None when it can: it must
    exist, have the SHA-256 the manifest recorded, and name this cell in its metadata."""
    path = cell_path(run_dir, cell_id)
    if not path.is_file():
        return "its file is missing"
    if record.get("sha256") is None:
        return "the manifest records no checksum for it"
    if file_digest(path) != record["sha256"]:
        return "its checksum does not match the manifest (damaged or replaced)"
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (pa.ArrowException, OSError) as err:  # pragma: no cover - checksum caught it
        return f"it is not a readable parquet file ({err})"
    if metadata.get(b"estbench.cell", b"").decode() != cell_id:
        return "its metadata names another cell"
    return None


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    """The manifest of a run directory: ``spec`` (the resolved spec the results came from),
    ``spec_toml`` (the text of the spec file last run into it), ``cells`` (id -> status,
    ``reason`` for skipped and failed cells, ``sha256`` for done ones), provenance and times.
    Readers use this, not ``spec.toml``, which a user may have edited."""
    run_dir = Path(run_dir)
    path = run_dir / "manifest.json"
    if not path.is_file():
        raise EstbenchError(
            f"'{run_dir}' is not a run directory (no manifest.json); pass the directory that "
            f"`estbench run` wrote, e.g. runs/quick"
        )
    try:
        manifest = read_json(path)
    except (OSError, ValueError) as err:
        raise EstbenchError(
            f"'{path}' is not readable JSON ({err}); rerun the spec into this directory to "
            f"rebuild it"
        ) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("cells"), dict):
        raise EstbenchError(f"'{path}' has no 'cells' table; rerun the spec into this directory")
    return manifest


def verified_cells(run_dir: str | Path) -> tuple[list[Path], dict[str, str]]:
    """(the cell files that belong to the run and are intact, {file name: why it was left out})
    for every done cell of the manifest and every other file in ``cells/``."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    good, left_out = [], {}
    for cell_id, record in sorted(manifest["cells"].items()):
        if record.get("status") != "done":
            continue
        problem = cell_problem(run_dir, cell_id, record)
        if problem is None:
            good.append(cell_path(run_dir, cell_id))
        else:
            left_out[f"{cell_id}.parquet"] = problem
    known = {path.name for path in good} | set(left_out)
    for path in sorted((run_dir / "cells").glob("*.parquet")):
        if path.name not in known:
            left_out[path.name] = "not a finished cell of this run's manifest"
    return good, left_out


def load_results(run_dir: str | Path, *,
                 on_skip: Callable[[str, str], None] | None = None) -> pd.DataFrame:
    """The whole results table of a run directory (every verified finished cell) as a DataFrame.

    Files the manifest does not vouch for (damaged, foreign, unfinished) are left out and
    reported through ``on_skip(file name, reason)``; by default one :class:`ResultsWarning`."""
    files, left_out = verified_cells(run_dir)
    if left_out:
        if on_skip is None:
            listed = "; ".join(f"{name}: {why}" for name, why in left_out.items())
            warnings.warn(f"{len(left_out)} file(s) in {Path(run_dir) / 'cells'} left out: "
                          f"{listed}", ResultsWarning, stacklevel=2)
        else:
            for name, why in left_out.items():
                on_skip(name, why)
    if not files:
        return SCHEMA.empty_table().to_pandas()
    tables = [pq.read_table(f, schema=SCHEMA) for f in files]
    return pa.concat_tables(tables).to_pandas()


def to_rows(records: Iterable[dict[str, Any]], common: dict[str, Any]) -> pd.DataFrame:
    """Build a schema-ordered frame from per-observation records plus shared columns."""
    frame = pd.DataFrame([{**common, **r} for r in records], columns=SCHEMA.names)
    for column in ("ci_low", "ci_high"):
        frame[column] = frame[column].astype("float64")
    frame["value"] = frame["value"].astype("float64")
    return frame


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
