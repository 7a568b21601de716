"""The scan workflow (gdm_ray.core.scan_workflow): one plan, run by the
in-process executor and by the Ray executor, gives identical answers; a
failed job is its model's error; the first pass resumes from a ScanState."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gdm_ray.core.data import DataSpec, load_splits
from gdm_ray.core.errors import ConfigError
from gdm_ray.core.executor import InProcessExecutor, ModelBlob, ModelContext
from gdm_ray.core.first_pass import ScanConfig
from gdm_ray.core.mesa import MESAConfig
from gdm_ray.core.model_io import file_sha256
from gdm_ray.core.scan_workflow import ZooScan, plan_model_scan, plan_zoo_scan, run_zoo_scan
from gdm_ray.store.rows import Provenance, class_rows, verdict_row
from gdm_ray.store.scanstate import ScanState

SCAN = ScanConfig(steps=150)
MESA = MESAConfig(steps=100, eval_samples=128)


@pytest.fixture(scope="module")
def splits():
    return load_splits(DataSpec(name="synthetic", num_classes=8, samples=3000))


def _blobs(folder: Path, splits) -> list[ModelBlob]:
    return [
        ModelBlob(p.stem, str(p), file_sha256(p), p.read_bytes(), None, splits.shape, splits.eval.num_classes)
        for p in sorted(folder.glob("*.pt"))
    ]


@pytest.fixture
def one_thread():
    """Both executors compute with one torch thread (a Ray task pins ray.task_cpus=1): bit for bit the same sums."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _table(scan: ZooScan) -> dict:
    out = {}
    for m, s in scan.models.items():
        if s.error is not None:
            out[m] = s.error
            continue
        r = s.result
        mesa = {
            k: (f.result.asr, f.result.weights, f.asr_eval, [p.detach().clone() for p in f.mesa.generators.parameters()])
            for k, f in s.searches.items()
        }
        out[m] = ([c.size for c in r.classes], [c.asr for c in r.classes], r.anomaly, s.within, r.flagged, r.score, mesa)
    return out


def test_one_plan_same_answer_in_process_and_on_ray(zoo, splits, one_thread):
    from gdm_ray.distributed.executor import RayExecutor
    from gdm_ray.distributed.runtime import RayConfig

    blobs = _blobs(zoo, splits)  # vendor-a (backdoored, class 2), vendor-b/c (clean), broken
    plan = plan_zoo_scan(splits.defense, [b.model_id for b in blobs], SCAN, MESA, seed=0)
    local_ex = InProcessExecutor()
    local = run_zoo_scan(plan, blobs, splits.defense, splits.eval, local_ex)
    with RayExecutor(RayConfig(num_cpus=2, log_to_driver=False)) as ray_ex:
        remote = run_zoo_scan(plan, blobs, splits.defense, splits.eval, ray_ex)
    assert local.reference == remote.reference == "zoo"
    a, b = _table(local), _table(remote)
    assert "corrupt" in a["broken"] and "corrupt" in b["broken"] and "/tmp/gdm-ray-model-" not in a["broken"]
    assert a["vendor-a"][4] == [2] and a["vendor-b"][4] == a["vendor-c"][4] == []
    for m in ("vendor-a", "vendor-b", "vendor-c"):
        sizes, asr, anomaly, within, flagged, score, mesa = a[m]
        assert b[m][:6] == (sizes, asr, anomaly, within, flagged, score), m
        assert set(b[m][6]) == set(mesa), m
        for k, (lv, w, e, params) in mesa.items():
            rlv, rw, re_, rparams = b[m][6][k]
            assert (rlv, rw, re_) == (lv, w, e)
            assert all(torch.equal(p, q) for p, q in zip(params, rparams))
    # 3 models x 1 chunk of 8 classes and one flagged class's MESA ran; the broken model's chunk failed
    assert ray_ex.summary()["tasks_run"] == 3 + 1 and ray_ex.summary()["tasks_failed"] == 1
    assert local_ex.summary()["tasks_run"] == 3 + 1 and local_ex.summary()["tasks_failed"] == 1
    assert local.models["broken"].result is None and local.models["broken"].searches == {}
    # the Parquet rows shaped in the store: the same class rows; verdicts equal but for the seconds
    prov = Provenance("h", "v")
    for m in ("vendor-a", "vendor-b", "vendor-c"):
        assert class_rows(local.models[m], splits.classes, prov) == class_rows(remote.models[m], splits.classes, prov)
        v, w = (verdict_row(x.models[m], "batched", x.reference, prov, seconds=1.0) for x in (local, remote))
        assert v == w and v["reference"] == "zoo" and v["config_hash"] == "h"
    broken = verdict_row(local.models["broken"], "batched", "zoo", prov)
    assert broken["error"] == a["broken"] and broken["backdoored"] is None and broken["model_sha256"] == local.models["broken"].sha256
    assert class_rows(local.models["broken"], splits.classes, prov) == []


def test_own_examples_same_answer_in_process_and_on_ray(zoo, splits, one_thread):
    """A model with clean examples of its own (vendor-a, backdoored) is searched on them
    in every stage (first pass, windows, MESA) on either executor, with the same answer."""
    from gdm_ray.distributed.executor import RayExecutor
    from gdm_ray.distributed.runtime import RayConfig

    blobs = [b for b in _blobs(zoo, splits) if b.model_id != "broken"]
    own = {"vendor-a": splits.eval.subset(torch.arange(200))}  # clean images the shared set does not hold
    scan = ScanConfig(steps=150, moving_window=True, stride=[4, 4])
    plan = plan_zoo_scan(splits.defense, [b.model_id for b in blobs], scan, MESA, seed=0, examples=own)
    assert plan.first_pass_of("vendor-a") is plan.own["vendor-a"] and len(plan.own["vendor-a"].eval_idx) == 40
    assert plan.first_pass_of("vendor-b") is plan.first_pass and plan.class_seed(2) == plan.base + 2
    local = run_zoo_scan(plan, blobs, splits.defense, splits.eval, InProcessExecutor(), examples=own)
    with RayExecutor(RayConfig(num_cpus=2, log_to_driver=False)) as ray_ex:
        remote = run_zoo_scan(plan, blobs, splits.defense, splits.eval, ray_ex, examples=own)
    a, b = _table(local), _table(remote)
    assert 2 in a["vendor-a"][4] and a["vendor-b"][4] == a["vendor-c"][4] == []
    assert {m: s.examples for m, s in local.models.items()} == {"vendor-a": 200, "vendor-b": None, "vendor-c": None}
    for m in a:
        assert b[m][:6] == a[m][:6], m
        assert set(b[m][6]) == set(a[m][6]), m
        for k, (lv, w, e, params) in a[m][6].items():
            assert b[m][6][k][:3] == (lv, w, e) and all(torch.equal(p, q) for p, q in zip(params, b[m][6][k][3]))
        heats = [(local.models[m].searches[k].heat, remote.models[m].searches[k].heat) for k in a[m][6]]
        assert all(h.box == g.box and torch.equal(h.heat, g.heat) for h, g in heats), m
    with pytest.raises(ConfigError, match=r"own examples given for \[\], planned for \['vendor-a'\]"):
        run_zoo_scan(plan, blobs, splits.defense, splits.eval, InProcessExecutor())


def test_single_model_plan_keeps_the_scan_commands_seeds(models, splits):
    """``gdm-ray scan``'s derivation: the search base is the draw right after plan_scan."""
    from gdm_ray.core.first_pass import plan_scan

    g = torch.Generator().manual_seed(7)
    first = plan_scan(splits.defense, SCAN, g)
    base = int(torch.randint(0, 2**62, (1,), generator=g))
    plan = plan_model_scan(splits.defense, "m", SCAN, MESA, seed=7)
    assert plan.first_pass.seed == first.seed and torch.equal(plan.first_pass.eval_idx, first.eval_idx)
    assert plan.class_seed(3) == base + 3
    assert plan_model_scan(splits.defense, "m", ScanConfig(method="baseline", moving_window=True), MESA, 7).mesa is None


def test_a_failed_job_is_that_jobs_error_and_the_rest_go_on():
    def fn(ctx: dict, job: int) -> int:
        if job == 2:
            raise ValueError(f"job={job} is bad\nsecond line")
        return ctx["add"] + job

    seen = []
    ex = InProcessExecutor()
    out = ex.map(fn, [0, 1, 2, 3], {"add": 10}, on_result=seen.append)
    assert [r.value for r in out] == [10, 11, None, 13]
    assert out[2].error == "job=2 is bad" and seen == out
    assert ex.summary() == {"tasks_run": 3, "tasks_failed": 1, "nodes": {"local": 3}}


def test_model_context_loads_a_model_once_per_run_of_its_jobs(models, splits, monkeypatch):
    import gdm_ray.core.executor as executor

    loads = []
    real = executor.load_model_bytes
    monkeypatch.setattr(executor, "load_model_bytes", lambda *a, **k: loads.append(a[1]) or real(*a, **k))
    p = models["clean"]
    ctx = ModelContext([ModelBlob("m", str(p), "x", p.read_bytes(), None, splits.shape, splits.eval.num_classes)])
    assert ctx.model("m") is ctx.model("m") and loads == [str(p)]
    import pickle  # only to check what a Ray task would be sent: no loaded module travels

    assert pickle.loads(pickle.dumps(ctx))._last is None


def test_first_pass_resumes_from_scan_state(models, splits, tmp_path):
    cfg = ScanConfig(steps=30, classes_per_pass=4)
    blobs = [
        ModelBlob(
            "m",
            str(models["backdoored"]),
            file_sha256(models["backdoored"]),
            models["backdoored"].read_bytes(),
            None,
            splits.shape,
            splits.eval.num_classes,
        )
    ]
    plan = plan_model_scan(splits.defense, "m", cfg, None, seed=0, full_search=False)
    whole = run_zoo_scan(plan, blobs, splits.defense, splits.eval, InProcessExecutor(), state=ScanState(tmp_path / "s"))
    assert whole.resumed == 0 and len(list((tmp_path / "s").glob("*.safetensors"))) == 2
    ex = InProcessExecutor()
    again = run_zoo_scan(plan, blobs, splits.defense, splits.eval, ex, state=ScanState(tmp_path / "s"))
    assert again.resumed == 2 and ex.summary()["tasks_run"] == 0
    assert [c.size for c in again.models["m"].result.classes] == [c.size for c in whole.models["m"].result.classes]
