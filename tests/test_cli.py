"""The `gdm-ray` CLI: overrides, outputs, and one clear line for each bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gdm_ray.cli.compose import compose_settings, config_dir
from gdm_ray.cli.main import COMMANDS, main
from gdm_ray.cli.settings import GROUP_DEFAULTS, SCHEMAS
from gdm_ray.core.data import DataSpec
from gdm_ray.core.model_io import load_model, save_torchscript
from gdm_ray.core.models import build_model
from gdm_ray.core.train import TrainConfig
from gdm_ray.core.triggers import TriggerSpec

# Tiny, fast settings: synthetic 16x16 grey data, a narrow CNN, a few epochs.
TINY = ["data=synthetic", "train=tiny", "arch.width=8", "progress=false", "threads=1"]
EVAL = ["data=synthetic", "progress=false", "threads=1"]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("gdm-ray: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def no_partial(root: Path) -> None:
    leftovers = [p for p in root.rglob("*") if ".partial-" in p.name or p.name.endswith(".tmp")]
    assert leftovers == []


@pytest.fixture(scope="module")
def attacked(tmp_path_factory) -> Path:
    """One backdoored synthetic model made through the real console script."""
    out = tmp_path_factory.mktemp("attack") / "run"
    exe = Path(sys.executable).with_name("gdm-ray")
    cmd = [str(exe), "attack", *TINY, "attack.target_class=1", "attack.rate=0.2", "train.epochs=6", f"out={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout
    return out


def test_help_lists_commands(capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    for command in ("attack", "evaluate", "demo"):
        assert f"  {command}" in out


def test_attack_writes_model_card_and_picture(attacked):
    assert {p.name for p in attacked.iterdir()} == {"model.pt", "model.json", "examples.png"}
    card = json.loads((attacked / "model.json").read_text())
    for key in ("trigger", "target", "rate", "clean_accuracy", "asr", "seed", "config_hash", "code_version", "sha256"):
        assert key in card
    assert card["target"] == 1 and card["rate"] == 0.2 and card["trigger"]["family"] == "bw3x3"
    assert card["asr"] >= 0.9, card
    assert card["clean_accuracy"] >= 0.6, card
    loaded = load_model(attacked / "model.pt")
    assert loaded.input_shape == (1, 16, 16) and loaded.num_classes == 4
    no_partial(attacked.parent)


def test_evaluate_reads_trigger_from_card(attacked, tmp_path, capsys):
    out = tmp_path / "ev"
    code, stdout, err = run_cli(["evaluate", f"model={attacked / 'model.pt'}", *EVAL, f"out={out}"], capsys)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    card = json.loads((attacked / "model.json").read_text())
    assert metrics["target_class"] == 1
    assert metrics["clean_accuracy"] == pytest.approx(card["clean_accuracy"])
    assert metrics["asr"] >= 0.9
    assert "attack success rate" in stdout


def test_evaluate_other_trigger_has_low_asr(attacked, tmp_path, capsys):
    out = tmp_path / "ev"
    args = ["evaluate", f"model={attacked / 'model.pt'}", *EVAL, "trigger=color3x3", "target_class=2", f"out={out}"]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    assert json.loads((out / "metrics.json").read_text())["asr"] < 0.5


def test_sig_attack_card_rebuilds_its_trigger(tmp_path, capsys):
    """trigger.family=sig through attack, and evaluate measures the same ASR from the card alone."""
    out = tmp_path / "sig"
    args = ["attack", *TINY, "trigger.family=sig", "trigger.delta=0.3", "attack.rate=0.3", "train.epochs=2", f"out={out}"]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    card = json.loads((out / "model.json").read_text())
    assert card["trigger"]["family"] == "sig" and card["trigger"]["delta"] == 0.3
    ev = tmp_path / "ev"
    code, _, err = run_cli(["evaluate", f"model={out / 'model.pt'}", *EVAL, f"out={ev}"], capsys)
    assert code == 0, err
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["asr"] == pytest.approx(card["asr"])


def test_same_config_same_card(tmp_path, capsys):
    cards = []
    for k in range(2):
        out = tmp_path / f"r{k}"
        code, _, err = run_cli(["attack", *TINY, "train.epochs=1", f"out={out}"], capsys)
        assert code == 0, err
        cards.append(json.loads((out / "model.json").read_text()))
    for key in ("clean_accuracy", "asr", "config_hash"):
        assert cards[0][key] == cards[1][key]
    # File bytes differ (TorchScript mangles class names per process); the weights must not.
    w0, w1 = (load_model(tmp_path / f"r{k}" / "model.pt").module.state_dict() for k in range(2))
    assert w0.keys() == w1.keys()
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


def test_cfg_job_prints_config_without_running(tmp_path, capsys):
    code, out, _ = run_cli(["attack", "data=cifar10", "arch=resnet9", f"out={tmp_path / 'x'}", "--cfg", "job"], capsys)
    assert code == 0
    assert "name: resnet9" in out and "name: cifar10" in out
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "args, needles",
    [
        (["nosuchcommand"], ["unknown command", "nosuchcommand"]),
        (["attack", "nosuchkey=1"], ["nosuchkey"]),
        (["attack", "data=nosuchdata"], ["nosuchdata"]),
        (["evaluate"], ["model"]),
    ],
)
def test_bad_overrides_are_one_line(args, needles, capsys):
    code, _, err = run_cli(args, capsys)
    assert code == 2
    assert_one_line_error(code, err, *needles)


def test_bad_inputs_fail_clearly_and_write_nothing(tmp_path, capsys):
    cases = [
        # trigger larger than the 16x16 image
        (["attack", *TINY, "trigger=block_solid", "trigger.size=[20,20]"], ["20x20", "larger than the image"]),
        (["attack", *TINY, "trigger=bw3x3", "trigger.number=600"], ["trigger.number=600"]),
        (["attack", *TINY, "attack.rate=-0.1"], ["attack.rate=-0.1"]),
        (["attack", *TINY, "attack.target_class=9"], ["attack.target_class=9"]),
        (["attack", *TINY, "train.epochs=0"], ["train.epochs=0"]),
        (["attack", *TINY, "train.epochs=oops"], ["train.epochs", "oops"]),
        (["attack", *TINY, "trigger=blend", "trigger.blend=1.5"], ["trigger.blend=1.5"]),
        (["attack", *TINY, "trigger=sig", "trigger.delta=2"], ["trigger.delta=2"]),
        (["attack", *TINY, "trigger.family=sig", "trigger.frequency=0"], ["trigger.frequency=0"]),
        (["attack", *TINY, "+data.bogus=1"], ["bogus"]),
        (
            ["attack", *TINY, "device=cuda:7"] if not torch.cuda.is_available() else ["attack", *TINY, "attack.target_class=99"],
            ["cuda:7" if not torch.cuda.is_available() else "99"],
        ),
    ]
    for k, (args, needles) in enumerate(cases):
        out = tmp_path / f"out{k}"
        code, _, err = run_cli([*args, f"out={out}"], capsys)
        assert code == 1, (args, err)
        assert_one_line_error(code, err, *needles)
        assert not out.exists(), args
    no_partial(tmp_path)


def test_bad_model_files(tmp_path, capsys):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04" + os.urandom(500))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(300))
    colour = tmp_path / "colour.pt"
    save_torchscript(build_model("small_cnn", 3, 4, 4), colour, (3, 16, 16))
    cases = [
        (tmp_path / "missing.pt", ["missing.pt", "no such file"]),
        (corrupt, ["corrupt.pt", "TorchScript"]),
        (garbage, ["garbage.pt"]),
        (colour, ["colour.pt", "1x16x16"]),  # a 3-channel model on grey data
    ]
    for path, needles in cases:
        out = tmp_path / f"ev-{path.stem}"
        args = ["evaluate", f"model={path}", *EVAL, "trigger=bw3x3", "target_class=1", f"out={out}"]
        code, _, err = run_cli(args, capsys)
        assert_one_line_error(code, err, *needles)
        assert not out.exists()


def test_data_that_is_not_images(tmp_path, capsys):
    folder = tmp_path / "notimages" / "classA"
    folder.mkdir(parents=True)
    (folder / "a.png").write_text("this is text, not a PNG")
    npz = tmp_path / "bad.npz"
    np.savez(npz, x=np.zeros((4, 3), dtype=np.complex64), y=np.zeros(4, dtype=np.int64))
    for args, needles in [
        (["data=imagefolder", f"data.path={tmp_path / 'notimages'}"], ["a.png", "not a readable image"]),
        (["data=npz", f"data.path={npz}"], ["bad.npz", "complex64"]),
        (["data=fashion_mnist", f"data.path={tmp_path}"], ["data.path=", "not found"]),
    ]:
        code, _, err = run_cli(["attack", "train=tiny", "progress=false", *args, f"out={tmp_path / 'o'}"], capsys)
        assert code == 1
        assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "o").exists()


GROUPS = {"data": DataSpec, "trigger": TriggerSpec, "train": TrainConfig}


@pytest.mark.parametrize(
    "group, option",
    [(g, p.stem) for g in ("data", "trigger", "train", "arch") for p in sorted((config_dir() / g).glob("*.yaml"))],
)
def test_every_config_group_option_builds(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if group == "data" and option in ("imagefolder", "npz"):
        overrides.append(f"data.path={tmp_path}")
    if group == "trigger" and option == "png":
        overrides.append(f"trigger.path={tmp_path / 't.png'}")
    s = compose_settings("attack", overrides)
    if group == "arch":
        assert build_model(s.arch.name, 1, 10, s.arch.width) is not None
    else:
        assert type(getattr(s, group)) is GROUPS[group]


REQUIRED = {
    "evaluate": ["model=m.pt"],
    "search": ["model=m.pt", "target_class=0"],
    "defend": ["model=m.pt", "target_class=auto"],
    "scan": ["model=m.pt"],
    "zoo-scan": ["zoo.path=z"],
    "sweep": ["model=m.pt", "target_class=0"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_composes_to_its_settings(command):
    """Each primary config composes on its schema, and the defaults there are the dataclasses' own."""
    s = compose_settings(command, REQUIRED.get(command, []))
    assert type(s) is SCHEMAS[command]
    for group, cls in GROUP_DEFAULTS.items():
        if hasattr(s, group) and command != "zoo-scan":
            assert getattr(s, group) == cls(), group


def test_a_mistyped_value_names_its_key(capsys):
    assert main(["attack", "data=synthetic", "train.epochs=abc"]) == 1
    err = capsys.readouterr().err
    assert "train.epochs" in err and "abc" in err and len(err.strip().splitlines()) == 1
