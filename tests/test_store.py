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
