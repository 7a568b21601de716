"""The results dataset (gdm_ray.store.dataset): Hive partitions by run and model on a local disk.

The S3 side is in test_store.py, against a real S3-protocol server."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from gdm_ray.store import VERDICT_SCHEMA, RunDir
from gdm_ray.store.dataset import PendingDataset, read_dataset
from gdm_ray.store.s3 import StoreError


def verdict(model_id: str, score: float) -> dict:
    return {"schema_version": 1, "model_id": model_id, "score": score, "backdoored": score > 2, "config_hash": "h", "code_version": "v"}


def write(root, run: str, rows: list[dict]) -> None:
    pending = PendingDataset(root, run)
    pending.add("verdicts", rows, VERDICT_SCHEMA)
    pending.publish()


def test_rows_land_in_one_partition_per_run_and_model_and_pyarrow_reads_them(tmp_path):
    root = tmp_path / "ds"
    write(root, "zs-1", [verdict("vendor-a", 5.0), verdict("vendor b/odd", 0.5)])
    write(root, "zs-2", [verdict("vendor-a", 4.0)])
    folders = sorted(p.parent.relative_to(root).as_posix() for p in root.rglob("part-*.parquet"))
    assert folders == ["verdicts/run=zs-1/model=vendor%20b%2Fodd", "verdicts/run=zs-1/model=vendor-a", "verdicts/run=zs-2/model=vendor-a"]
    # another tool's view: pyarrow's own Hive partitioning, which decodes the escaped model id
    table = ds.dataset(root / "verdicts", format="parquet", partitioning="hive").to_table()
    got = sorted(zip(table.column("run").to_pylist(), table.column("model").to_pylist(), table.column("score").to_pylist()))
    assert got == [("zs-1", "vendor b/odd", 0.5), ("zs-1", "vendor-a", 5.0), ("zs-2", "vendor-a", 4.0)]
    ours = read_dataset(root, "verdicts", model="vendor-a")
    assert sorted(zip(ours.column("run").to_pylist(), ours.column("score").to_pylist())) == [("zs-1", 5.0), ("zs-2", 4.0)]
    assert read_dataset(root, "verdicts", run="zs-1").num_rows == 2
    with pytest.raises(StoreError, match="no verdicts rows model=nobody"):
        read_dataset(root, "verdicts", model="nobody")


def test_running_again_replaces_the_runs_partitions(tmp_path):
    root = tmp_path / "ds"
    write(root, "zs", [verdict("a", 5.0), verdict("b", 1.0)])
    write(root, "other", [verdict("b", 1.5)])
    write(root, "zs", [verdict("a", 6.0)])  # b is gone from the zoo
    rows = read_dataset(root, "verdicts").to_pylist()
    assert sorted((r["run"], r["model"], r["score"]) for r in rows) == [("other", "b", 1.5), ("zs", "a", 6.0)]


def test_a_failed_publish_leaves_the_previous_state(tmp_path):
    root = tmp_path / "ds"
    write(root, "zs", [verdict("a", 5.0)])
    before = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    # a file where model=c's folder must go: that partition cannot be written
    blocker = root / "verdicts" / "run=zs" / "model=c"
    blocker.write_text("in the way")
    pending = PendingDataset(root, "zs")
    pending.add("verdicts", [verdict("a", 7.0), verdict("b", 1.0), verdict("c", 2.0)], VERDICT_SCHEMA)
    with pytest.raises(StoreError, match="cannot write verdicts/run=zs/model=c"):
        pending.publish()
    blocker.unlink()
    after = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert after == before  # a's and b's new files removed again, a's old one never touched
    assert read_dataset(root, "verdicts").column("score").to_pylist() == [5.0]
    assert not list(root.rglob("*.tmp"))


def test_a_failed_command_adds_nothing_to_the_dataset(tmp_path):
    root = tmp_path / "ds"
    with pytest.raises(RuntimeError, match="boom"):
        with RunDir(tmp_path / "run", "scan", dataset=root) as run:
            run.write_table("verdict.parquet", [verdict("m", 3.0)], VERDICT_SCHEMA, "verdicts")
            raise RuntimeError("boom")
    assert not root.exists() or not list(root.rglob("*.parquet"))
    with RunDir(tmp_path / "run", "scan", dataset=root) as run:
        run.write_table("verdict.parquet", [verdict("m", 3.0)], VERDICT_SCHEMA, "verdicts")
    assert len(list((root / "verdicts" / "run=run" / "model=m").glob("part-*.parquet"))) == 1
    assert (tmp_path / "run" / "verdict.parquet").is_file()


def test_the_dataset_must_be_a_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    from gdm_ray.core.errors import ConfigError

    with pytest.raises(ConfigError, match="dataset=.*file exists and is not a folder"):
        RunDir(tmp_path / "run", "scan", dataset=tmp_path / "file")
    assert not list(tmp_path.glob(".run.partial-*"))  # the run's staging folder is gone too


def test_rows_keep_the_tables_schema(tmp_path):
    root = tmp_path / "ds"
    write(root, "zs", [verdict("a", 5.0)])
    table = read_dataset(root, "verdicts")
    assert table.schema.field("target_class").type == pa.int64() and table.schema.field("flagged").type == pa.list_(pa.int64())
