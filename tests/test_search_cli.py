"""`gdm-ray search` and `gdm-ray defend` end to end on a synthetic TorchScript model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import PINNED_MESA

from gdm_ray.cli.main import main
from gdm_ray.core.ensemble import load_ensemble
from gdm_ray.core.model_io import clone_model, load_model

TINY = ["data=synthetic", "train=tiny", "arch.width=8", "progress=false", "threads=1"]
# Short searches that still find the synthetic backdoor (see tests/test_defense.py).
FAST = [
    "data=synthetic",
    "progress=false",
    "threads=1",
    *PINNED_MESA,
    "mesa.steps=250",
    "mesa.log_every=50",
    "mesa.eval_samples=256",
    "baseline.steps=120",
    "baseline.restarts=2",
    "samples_per_level=4",
]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A backdoored synthetic model (TorchScript, with its card) made by `gdm-ray attack`."""
    out = tmp_path_factory.mktemp("attack") / "run"
    assert main(["attack", *TINY, "attack.target_class=1", "attack.rate=0.2", "train.epochs=6", f"out={out}"]) == 0
    card = json.loads((out / "model.json").read_text())
    assert card["asr"] >= 0.9, card
    return out / "model.pt"


def test_help_lists_search_and_defend(capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0 and "  search" in out and "  defend" in out


def test_search_mesa_writes_ensemble_and_pictures(model, tmp_path, capsys):
    out = tmp_path / "s"
    code, stdout, err = run_cli(["search", f"model={model}", "target_class=1", *FAST, f"out={out}"], capsys)
    assert code == 0, err
    assert {"ensemble", "samples.png", "pca.png", "curves.png", "search.json"} <= {p.name for p in out.iterdir()}
    for png in ("samples.png", "pca.png", "curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "search.json").read_text())
    assert summary["method"] == "mesa" and summary["levels"] == 3 and summary["target_class"] == 1
    # the levels above beta 0 reach their thresholds, on held-out images too
    for beta, asr in zip(summary["betas"][1:], summary["level_asr"][1:]):
        assert asr > beta
    assert summary["found_asr_eval"] > 0.3
    ens = load_ensemble(out / "ensemble")
    assert ens.target_class == 1
    assert ens.manifest["source_model_sha256"] == load_model(model).sha256
    p, a = ens.sample(8, rng=torch.Generator().manual_seed(0))
    assert p.shape == (8, 1, 3, 3) and a.shape == (8, 3, 3)
    assert "level ASR" in stdout


def test_search_is_deterministic(model, tmp_path, capsys):
    runs = []
    for k in range(2):
        out = tmp_path / f"s{k}"
        args = ["search", f"model={model}", "target_class=1", *FAST, "mesa.steps=60", f"out={out}"]
        assert run_cli(args, capsys)[0] == 0
        s = json.loads((out / "search.json").read_text())
        runs.append((s["level_asr"], s["entropy"], s["weights"], s["found_asr_eval"]))
    assert runs[0] == runs[1]


def test_search_baseline_writes_trigger(model, tmp_path, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "b"
    code, _, err = run_cli(["search", f"model={model}", "target_class=1", "method=baseline", *FAST, f"out={out}"], capsys)
    assert code == 0, err
    t = load_file(str(out / "trigger.safetensors"))
    assert t["pattern"].shape == (1, 3, 3) and t["mask"].shape == (3, 3)
    assert json.loads((out / "search.json").read_text())["found_asr_eval"] > 0.8


@pytest.mark.parametrize("method", ["mesa", "baseline"])
def test_defend_repairs_the_torchscript_model(model, method, tmp_path, capsys):
    out = tmp_path / "d"
    args = ["defend", f"model={model}", "target_class=1", f"method={method}", *FAST, "defense.epochs=4", f"out={out}"]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert m["real_trigger"]["family"] == "bw3x3" and m["real_target"] == 1  # read from the model card
    assert m["before"]["asr"] >= 0.9
    assert m["after"]["asr"] < 0.25, m["after"]
    assert m["after"]["clean_accuracy"] >= m["before"]["clean_accuracy"] - 0.08, m
    assert m["after"]["found_asr"] < m["before"]["found_asr"]
    repaired = load_model(out / "model.pt")
    assert repaired.sha256 == m["repaired_sha256"]
    assert repaired.meta["repaired_from"] == load_model(model).sha256
    assert "ASR of the real trigger" in stdout and "R-Acc of the real trigger" in stdout and "DER" in stdout
    assert m["before"]["robust_accuracy"] <= 0.1 and m["after"]["robust_accuracy"] > 0.5 and m["der"] > 0.75, m


def test_defend_finetune_is_the_floor_no_search_and_every_metric(model, tmp_path, capsys):
    """method=finetune: no search and none of its pictures, the same retraining budget on
    clean images; metrics.json and repair.parquet with R-Acc and DER. It needs no target:
    target_class=auto scans nothing and gives the same repair as a class index."""
    import pyarrow.parquet as pq

    runs = {}
    for target in ("1", "auto"):
        out = tmp_path / f"ft-{target}"
        args = ["defend", f"model={model}", f"target_class={target}", "method=finetune", *FAST, "defense.epochs=2", f"out={out}"]
        code, stdout, err = run_cli(args, capsys)
        assert code == 0, err
        assert {p.name for p in out.iterdir()} == {"model.pt", "metrics.json", "repair.parquet"}, list(out.iterdir())
        m = json.loads((out / "metrics.json").read_text())
        runs[target] = m
        assert m["method"] == "finetune" and m["targets"] == [] and m["search"]["search_seconds"] < 0.5 and m["real_target"] == 1
        b, a = m["before"], m["after"]
        assert b["asr"] >= 0.9 and b["robust_accuracy"] + b["asr"] <= 1 + 1e-12 and a["robust_accuracy"] + a["asr"] <= 1 + 1e-12
        assert b["found_asr"] is None and a["found_asr_by_class"] == {}
        der = (max(0, b["asr"] - a["asr"]) - max(0, b["clean_accuracy"] - a["clean_accuracy"]) + 1) / 2
        assert m["der"] == pytest.approx(der, abs=1e-12) and 0 <= m["der"] <= 1
        (row,) = pq.read_table(out / "repair.parquet").to_pylist()
        assert row["method"] == "finetune" and row["targets"] == [] and row["target_class"] == target
        assert row["robust_accuracy_before"] == b["robust_accuracy"] and row["robust_accuracy_after"] == a["robust_accuracy"]
        assert row["der"] == m["der"] and row["asr_after"] == a["asr"] and row["found_asr_before"] is None
        repaired = load_model(out / "model.pt")
        assert repaired.sha256 == m["repaired_sha256"] == row["repaired_sha256"]
        original = load_model(model).module.state_dict()
        assert any(not torch.equal(v, original[k]) for k, v in repaired.module.state_dict().items())  # it did retrain
        assert "none: plain fine-tuning" in stdout and "R-Acc of the real trigger" in stdout and "DER" in stdout
    assert runs["1"]["before"] == runs["auto"]["before"] and runs["1"]["after"] == runs["auto"]["after"]


@pytest.mark.parametrize(
    "command, extra, code, needle",
    [
        ("search", FAST, 1, "method=finetune searches no triggers"),
        ("sweep", ["data=synthetic", "progress=false"], 2, "'method'"),  # the sweep is MESA's: no method to choose (a usage error)
    ],
)
def test_finetune_has_nothing_to_search_or_sweep(model, command, extra, code, needle, tmp_path, capsys):
    out = tmp_path / "bad"
    got, _, err = run_cli([command, f"model={model}", "target_class=1", "method=finetune", *extra, f"out={out}"], capsys)
    lines = [ln for ln in err.splitlines() if ln.startswith("gdm-ray: error:")]
    assert got == code and len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0], lines[0]
    assert not out.exists()


def test_clone_of_torchscript_model_is_trainable_and_independent(model):
    src = load_model(model).module
    copy = clone_model(src)
    assert all(p.is_leaf and p.requires_grad for p in copy.parameters())
    torch.optim.SGD(copy.parameters(), lr=0.1)  # a deepcopy'd ScriptModule fails here
    with torch.no_grad():
        next(copy.parameters()).add_(1.0)
    assert not torch.equal(next(copy.parameters()), next(src.parameters()))


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["method=magic"], ["method='magic'"]),
        (["target_class=9"], ["target_class=9"]),
        (["target_class=abc"], ["target_class='abc'"]),
        (["mesa.alpha=-1"], ["mesa.alpha=-1"]),
        (["mesa.trigger_size=[20,20]"], ["mesa.trigger_size", "larger than the image"]),
        (["mesa.betas=[0.5,0.2,0.1]"], ["mesa.betas"]),
        (["defense.rate=0"], ["defense.rate=0"]),
    ],
)
def test_bad_search_inputs_are_one_line_and_write_nothing(model, extra, needles, tmp_path, capsys):
    out = tmp_path / "bad"
    base = ["defend", f"model={model}", "target_class=1", *FAST]
    code, _, err = run_cli([*base, *extra, f"out={out}"], capsys)
    assert code == 1, err
    lines = [ln for ln in err.splitlines() if ln.startswith("gdm-ray: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_missing_model_fails_before_loading_data(tmp_path, capsys):
    code, _, err = run_cli(["search", f"model={tmp_path / 'nope.pt'}", "target_class=0", *FAST], capsys)
    assert code == 1 and "nope.pt" in err and "no such file" in err
