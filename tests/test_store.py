import os
import stat

import pandas as pd
import pytest

from estbench import EstbenchError, SCHEMA
from estbench.store import validate, write_cell


def _row(**overrides):
    row = {name: "x" for name in SCHEMA.names}
    row.update(seed=0, step=0, value=1.0, ci_low=float("nan"), ci_high=float("nan"),
               phase="train", timestamp=pd.Timestamp.now(tz="UTC"))
    row.update(overrides)
    return pd.DataFrame([row], columns=SCHEMA.names)


def test_valid_rows_pass_and_write_atomically(tmp_path):
    path = tmp_path / "cells" / "c.parquet"
    write_cell(_row(), path)
    assert path.is_file() and not list(path.parent.glob("*.tmp"))


def test_unknown_phase_is_rejected():
    with pytest.raises(EstbenchError, match="unknown phases"):
        validate(_row(phase="warmup"))


def test_missing_or_extra_columns_are_rejected():
    with pytest.raises(EstbenchError, match="missing \\['value'\\]"):
        validate(_row().drop(columns=["value"]))
    with pytest.raises(EstbenchError, match="extra \\['colour'\\]"):
        validate(_row().assign(colour=1))


def test_missing_values_are_rejected():
    with pytest.raises(EstbenchError, match="column 'metric' has missing values"):
        validate(_row(metric=None))


def test_a_failed_write_leaves_no_file(tmp_path):
    path = tmp_path / "c.parquet"
    with pytest.raises(Exception):
        write_cell(_row(seed="not an int"), path)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_follow_the_umask(tmp_path, umask):
    from estbench.store import atomic_write_text

    previous = os.umask(umask)
    try:
        write_cell(_row(), tmp_path / "cells" / "c.parquet")
        atomic_write_text(tmp_path / "manifest.json", "{}")
    finally:
        os.umask(previous)
    for path in (tmp_path / "cells" / "c.parquet", tmp_path / "manifest.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_a_cell_file_carries_its_identity_and_checksum(tmp_path):
    import pyarrow.parquet as pq

    from estbench.store import cell_problem, file_digest

    path = tmp_path / "cells" / "a.parquet"
    digest = write_cell(_row(), path, {"cell": "a", "run": "r"})
    assert digest == file_digest(path)
    assert pq.read_schema(path).metadata[b"estbench.cell"] == b"a"
    assert cell_problem(tmp_path, "a", {"sha256": digest}) is None
    assert "checksum" in cell_problem(tmp_path, "a", {"sha256": "0" * 64})
    assert "no checksum" in cell_problem(tmp_path, "a", {})
    (tmp_path / "cells" / "b.parquet").write_bytes(path.read_bytes())
    assert "another cell" in cell_problem(tmp_path, "b", {"sha256": digest})


def test_readers_use_the_manifest_spec_not_an_edited_spec_toml(tmp_path):
    from estbench.cli import main
    from estbench.store import read_manifest

    spec = tmp_path / "s.toml"
    spec.write_text('name = "m"\n[measure]\ngradient_samples = 20\nthroughput = false\n'
                    '[[task]]\nname = "bernoulli-toy"\n[[estimator]]\nname = "reinforce"\n')
    out = tmp_path / "run"
    assert main(["run", str(spec), "--out", str(out), "--no-progress"]) == 0
    (out / "spec.toml").write_text("edited")
    manifest = read_manifest(out)
    assert manifest["spec_toml"] == spec.read_text()
    assert manifest["spec"]["measure"]["gradient_samples"] == 20
    (out / "manifest.json").unlink()
    with pytest.raises(EstbenchError, match="no manifest.json"):
        read_manifest(out)
