"""torch.export programs (.pt2): round trips, user-made programs, retraining, refusing unsafe archives."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from gdm_ray.cli.main import main
from gdm_ray.core.data import ImageSet
from gdm_ray.core.errors import ModelLoadError
from gdm_ray.core.model_io import clone_model, load_model, save_like, save_safetensors, save_torchscript
from gdm_ray.core.models import build_model
from gdm_ray.core.program import ProgramModule, check_graph, save_program
from gdm_ray.core.train import TrainConfig, train_classifier

SHAPE = (1, 28, 28)


def _net() -> nn.Module:
    torch.manual_seed(0)
    m = build_model("small_cnn", 1, 10, 8)
    with torch.no_grad():  # non-trivial statistics, so buffers must round-trip too
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


def _x(n: int = 5) -> torch.Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(3))


def _bn_mean(m: ProgramModule) -> torch.Tensor:
    return m.program.get_buffer("features.0.1.running_mean").clone()


@pytest.fixture
def pt2(tmp_path) -> Path:
    path = tmp_path / "m.pt2"
    save_program(_net(), path, SHAPE, {"arch": "small_cnn", "note": "hi"})
    return path


def test_program_round_trip_keeps_logits_shape_and_meta(pt2):
    loaded = load_model(pt2)
    assert isinstance(loaded.module, ProgramModule) and loaded.meta["format"] == "program"
    assert loaded.input_shape == SHAPE and loaded.num_classes == 10 and loaded.meta["note"] == "hi"
    assert not loaded.module.training
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(_x(7)), _net()(_x(7)))


def test_a_users_fixed_batch_program_runs_on_any_batch(tmp_path):
    """torch.export.export without dynamic shapes fixes the batch at the example's size (often 1)."""
    ep = torch.export.export(_net(), (torch.zeros(1, *SHAPE),))
    torch.export.save(ep, tmp_path / "user.pt2")
    loaded = load_model(tmp_path / "user.pt2")  # no gdm-ray description: the input shape is the program's own
    assert loaded.input_shape == SHAPE and loaded.module.fixed_batch == 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(_x(5)), _net()(_x(5)))
    out = save_like(loaded.module, tmp_path / "repaired", loaded.meta, SHAPE)
    assert out.suffix == ".pt2" and load_model(out).module.fixed_batch == 1


def test_program_trains_batchnorm_in_train_mode_and_keeps_it_frozen_on_request(pt2):
    m = load_model(pt2).module
    data = ImageSet(_x(64), torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(1)), [str(i) for i in range(10)])
    before, w0 = _bn_mean(m), m.program.get_parameter("head.1.weight").clone()
    frozen = clone_model(m)
    losses = train_classifier(m, data, TrainConfig(epochs=2, batch_size=16, lr=0.05), torch.Generator().manual_seed(0))
    assert losses[-1] < losses[0]
    assert not torch.equal(before, _bn_mean(m)), "BatchNorm statistics should move in train mode"
    assert not torch.equal(w0, m.program.get_parameter("head.1.weight"))
    assert not m.training  # the caller's mode is restored
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.05, batchnorm="frozen")
    train_classifier(frozen, data, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(before, _bn_mean(frozen)), "batchnorm=frozen must keep the statistics the model came with"
    assert not torch.equal(w0, frozen.program.get_parameter("head.1.weight"))


def test_program_dropout_follows_the_mode(pt2):
    m = load_model(pt2).module
    with torch.no_grad():
        m.train()
        a, b = m(_x()), m(_x())
        m.eval()
        c, d = m(_x()), m(_x())
    assert not torch.equal(a, b) and torch.equal(c, d)


@pytest.mark.parametrize("fmt", ["torchscript", "program", "safetensors"])
def test_a_repaired_model_is_written_in_the_format_it_came_in(tmp_path, fmt):
    net = _net()
    path = {
        "torchscript": lambda: save_torchscript(net, tmp_path / "in.pt", SHAPE),
        "program": lambda: (save_program(net, tmp_path / "in.pt2", SHAPE, {}), tmp_path / "in.pt2")[1],
        "safetensors": lambda: save_safetensors(net, tmp_path / "in.safetensors", "small_cnn", SHAPE, 10, 8),
    }[fmt]()
    loaded = load_model(path)
    out = save_like(loaded.module, tmp_path / "model", loaded.meta, SHAPE, {"method": "mesa"})
    assert out.name == {"torchscript": "model.pt", "program": "model.pt2", "safetensors": "model.safetensors"}[fmt]
    again = load_model(out)
    assert again.meta["format"] == fmt
    with torch.no_grad():
        torch.testing.assert_close(again.module(_x()), net(_x()))


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy a .pt2 zip, passing each entry's (name, bytes) through edit."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, edit(info.filename, zin.read(info.filename)))
    return dst


def _edit_json(suffix: str, change):
    def edit(name: str, data: bytes) -> bytes:
        if name.endswith(suffix):
            d = json.loads(data)
            change(d)
            return json.dumps(d).encode()
        return data

    return edit


def _first_weight(d: dict) -> None:
    next(iter(d["config"].values()))["use_pickle"] = True


def _canary_expr(canary: Path):
    def change(d: dict) -> None:
        def walk(o):
            if isinstance(o, dict):
                for k in o:
                    if k == "expr_str":
                        o[k] = f"__import__('os').system('touch {canary}')"
                    else:
                        walk(o[k])
            elif isinstance(o, list):
                for v in o:
                    walk(v)

        walk(d)

    return change


def _object_constant(d: dict) -> None:
    d["config"]["evil"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": False}


def _guards(canary: Path):
    def change(d: dict) -> None:
        d["guards_code"] = [f"__import__('os').system('touch {canary}')"]

    return change


@pytest.mark.parametrize(
    ("entry", "change", "needle"),
    [
        ("weights_config.json", lambda c: _first_weight, "stored as a pickle"),
        ("constants_config.json", lambda c: _object_constant, "Python or script object"),
        ("models/model.json", _guards, "guard code"),
        ("models/model.json", _canary_expr, "shape expression"),
    ],
)
def test_an_unsafe_program_is_refused_before_torch_reads_it(pt2, tmp_path, entry, change, needle):
    canary = tmp_path / "pwned"
    bad = _rewrite(pt2, tmp_path / "bad.pt2", _edit_json(entry, change(canary)))
    with pytest.raises(ModelLoadError, match=needle) as err:
        load_model(bad)
    assert "\n" not in str(err.value) and str(bad) in str(err.value)
    assert not canary.exists()


def test_a_graph_calling_python_is_refused():
    gm = torch.export.export(nn.Linear(2, 2), (torch.zeros(2, 2),)).module(check_guards=False)  # as load_program builds it
    check_graph(Path("x.pt2"), gm)  # aten.linear only

    def leak(x):  # any Python callable: a crafted graph could name one
        return x

    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    with gm.graph.inserting_after(node):
        gm.graph.call_function(leak, (node,))
    with pytest.raises(ModelLoadError, match="calls 'leak', not an ATen operator"):
        check_graph(Path("x.pt2"), gm)


def test_a_truncated_program_is_one_line(pt2, tmp_path):
    bad = tmp_path / "cut.pt2"
    bad.write_bytes(pt2.read_bytes()[: len(pt2.read_bytes()) // 2])
    with pytest.raises(ModelLoadError) as err:
        load_model(bad)
    assert "\n" not in str(err.value) and str(bad) in str(err.value)


def test_defend_repairs_a_program_and_writes_pt2(tmp_path, capsys):
    """attack -> the same network as a .pt2 (card beside it) -> defend: model.pt2 out, backdoor gone."""
    run = tmp_path / "attack"
    tiny = ["data=synthetic", "train=tiny", "arch.width=8", "progress=false", "threads=1"]
    assert main(["attack", *tiny, "attack.target_class=1", "attack.rate=0.2", "train.epochs=6", f"out={run}"]) == 0
    card = json.loads((run / "model.json").read_text())
    ts = load_model(run / "model.pt")
    net = build_model(card["arch"], ts.input_shape[0], ts.num_classes, card["width"])
    net.load_state_dict(ts.module.state_dict())
    save_program(net.eval(), run / "model.pt2", ts.input_shape, {})
    (run / "model.pt").unlink()  # the card (model.json) now describes the program
    out = tmp_path / "d"
    args = ["defend", f"model={run / 'model.pt2'}", "target_class=1", "method=baseline", "data=synthetic", "progress=false",
            "threads=1", "baseline.steps=120", "baseline.restarts=2", "defense.epochs=4", f"out={out}"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    assert m["repaired_model"] == "model.pt2" and not (out / "model.pt").exists()
    assert m["before"]["asr"] >= 0.9 and m["after"]["asr"] < 0.25, m["after"]
    repaired = load_model(out / "model.pt2")
    assert repaired.meta["format"] == "program" and repaired.sha256 == m["repaired_sha256"]
