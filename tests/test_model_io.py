"""Model files: TorchScript and safetensors round trips, foreign models, and load errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from gdm_ray.core.errors import ModelLoadError
from gdm_ray.core.model_io import LoadOptions, file_sha256, load_model, save_safetensors, save_torchscript
from gdm_ray.core.models import build_model


def _model(arch: str, channels: int, classes: int, width: int) -> nn.Module:
    torch.manual_seed(0)
    m = build_model(arch, channels, classes, width=width)
    # non-trivial BatchNorm statistics, so buffers must round-trip too
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


ARCH_CASES = [("small_cnn", 1, (1, 28, 28), 10, 8), ("resnet9", 3, (3, 32, 32), 10, 8), ("small_cnn", 3, (3, 20, 24), 5, 4)]


def _no_temp_files(directory: Path) -> None:
    left = [p.name for p in directory.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
    assert not left, f"temporary files left behind: {left}"


def _logits(module: nn.Module, shape) -> torch.Tensor:
    x = torch.rand(4, *shape, generator=torch.Generator().manual_seed(42))
    with torch.no_grad():
        return module(x)


@pytest.mark.parametrize(("arch", "channels", "shape", "classes", "width"), ARCH_CASES)
def test_torchscript_round_trip(tmp_path, arch, channels, shape, classes, width):
    model = _model(arch, channels, classes, width)
    path = save_torchscript(model, tmp_path / "m.pt", shape, meta={"note": "hello"})
    assert path == tmp_path / "m.pt" and path.is_file()
    _no_temp_files(tmp_path)
    loaded = load_model(path)  # the input shape comes from the file
    assert loaded.input_shape == shape
    assert loaded.num_classes == classes
    assert loaded.meta["format"] == "torchscript"
    assert loaded.meta["note"] == "hello"
    assert loaded.path == str(path)
    assert loaded.sha256 == file_sha256(path) and len(loaded.sha256) == 64
    assert not loaded.module.training
    torch.testing.assert_close(_logits(loaded.module, shape), _logits(model, shape))


@pytest.mark.parametrize(("arch", "channels", "shape", "classes", "width"), ARCH_CASES)
def test_safetensors_round_trip(tmp_path, arch, channels, shape, classes, width):
    model = _model(arch, channels, classes, width)
    path = save_safetensors(model, tmp_path / "m.safetensors", arch, shape, classes, width=width)
    _no_temp_files(tmp_path)
    loaded = load_model(path, input_shape=shape, num_classes=classes)
    assert loaded.num_classes == classes
    assert loaded.input_shape == shape
    assert loaded.meta["arch"] == arch and loaded.meta["format"] == "safetensors"
    assert type(loaded.module) is type(model)
    torch.testing.assert_close(_logits(loaded.module, shape), _logits(model, shape))


def test_save_leaves_model_mode_and_overwrites_atomically(tmp_path):
    model = _model("small_cnn", 1, 3, 4).train()
    save_torchscript(model, tmp_path / "m.pt", (1, 12, 12))
    assert model.training, "saving must restore the training flag"
    first = file_sha256(tmp_path / "m.pt")
    with torch.no_grad():
        model.head[-1].bias.add_(1.0)
    save_torchscript(model, tmp_path / "m.pt", (1, 12, 12))
    save_safetensors(model, tmp_path / "sub" / "m.safetensors", "small_cnn", (1, 12, 12), 3, width=4)
    assert file_sha256(tmp_path / "m.pt") != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "sub"]
    _no_temp_files(tmp_path)
    _no_temp_files(tmp_path / "sub")


class _Foreign(nn.Module):
    """A custom architecture: 3 x 20 x 24 in, 7 logits out (no gdm_ray code)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 18 * 22, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_foreign_torchscript_model(tmp_path):
    torch.manual_seed(1)
    model = _Foreign().eval()
    path = tmp_path / "foreign.pt"
    torch.jit.save(torch.jit.script(model), str(path))  # plain TorchScript, no gdm_ray metadata
    loaded = load_model(path, input_shape=(3, 20, 24))
    assert loaded.num_classes == 7
    assert loaded.input_shape == (3, 20, 24)
    torch.testing.assert_close(_logits(loaded.module, (3, 20, 24)), _logits(model, (3, 20, 24)))
    # with no recorded shape and none given, loading says so instead of guessing
    with pytest.raises(ModelLoadError, match="input shape unknown"):
        load_model(path)
    # the fixed-size head rejects another image size
    with pytest.raises(ModelLoadError, match="3x28x28"):
        load_model(path, input_shape=(3, 28, 28))


class _Flat(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).sum(1)


class _Three(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :3]


class _One(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :1]


class _NaN(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :4] / 0.0 * 0.0


def _expect_error(path: Path, needle: str | None = None, **kwargs) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_model(path, **kwargs)
    msg = str(info.value)
    assert str(path) in msg
    assert "\n" not in msg
    if needle is not None:
        assert re.search(needle, msg), msg
    return msg


def test_missing_file(tmp_path):
    _expect_error(tmp_path / "nope.pt", "no such file")
    _expect_error(tmp_path, "no such file")  # a directory is not a model file


def test_random_bytes(tmp_path):
    path = tmp_path / "random.pt"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes())
    _expect_error(path, input_shape=(1, 28, 28))
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    _expect_error(empty, "neither a TorchScript archive, a torch.export program .* nor a safetensors file")


def test_truncated_torchscript(tmp_path):
    good = save_torchscript(_model("small_cnn", 1, 10, 4), tmp_path / "good.pt", (1, 28, 28))
    path = tmp_path / "truncated.pt"
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    _expect_error(path, "corrupt or unreadable TorchScript")


def test_truncated_safetensors(tmp_path):
    good = save_safetensors(_model("small_cnn", 1, 10, 4), tmp_path / "good.safetensors", "small_cnn", (1, 28, 28), 10, width=4)
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    _expect_error(path, "corrupt safetensors")


def test_safetensors_weights_do_not_fit_arch(tmp_path):
    model = _model("small_cnn", 1, 10, 8)
    wrong_width = save_safetensors(model, tmp_path / "w.safetensors", "small_cnn", (1, 28, 28), 10, width=16)
    _expect_error(wrong_width, "weights do not fit arch 'small_cnn'")
    wrong_arch = save_safetensors(model, tmp_path / "a.safetensors", "resnet9", (1, 28, 28), 10, width=8)
    _expect_error(wrong_arch, "weights do not fit arch 'resnet9'")
    wrong_classes = save_safetensors(model, tmp_path / "k.safetensors", "small_cnn", (1, 28, 28), 4, width=8)
    _expect_error(wrong_classes, "weights do not fit")


def test_safetensors_header_problems(tmp_path):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in _model("small_cnn", 1, 10, 4).state_dict().items()}
    bare = tmp_path / "bare.safetensors"
    save_file(state, str(bare))
    _expect_error(bare, "names no architecture")
    # naming the arch is not enough without a shape: the header's or the data's
    _expect_error(bare, "input shape unknown", arch="small_cnn")
    loaded = load_model(bare, (1, 28, 28), 10, arch="small_cnn", options=LoadOptions(width=4))
    assert loaded.meta["format"] == "safetensors" and loaded.num_classes == 10
    unknown = tmp_path / "unknown.safetensors"
    save_file(state, str(unknown), metadata={"arch": "vgg", "input_shape": json.dumps([1, 28, 28]), "num_classes": "10"})
    _expect_error(unknown, "unknown architecture 'vgg'")
    with pytest.raises(ModelLoadError, match="'vgg'"):
        save_safetensors(_model("small_cnn", 1, 10, 4), tmp_path / "x.safetensors", "vgg", (1, 28, 28), 10)
    _no_temp_files(tmp_path)


def test_wrong_input_channels(tmp_path):
    model = _model("small_cnn", 1, 10, 4)
    ts = save_torchscript(model, tmp_path / "m.pt", (1, 28, 28))
    _expect_error(ts, "3x28x28", input_shape=(3, 28, 28))
    st = save_safetensors(model, tmp_path / "m.safetensors", "small_cnn", (1, 28, 28), 10, width=4)
    _expect_error(st, "3x28x28", input_shape=(3, 28, 28))
    # without a recorded shape the forward pass itself finds the mismatch
    bare = tmp_path / "bare.pt"
    torch.jit.save(torch.jit.script(model), str(bare))
    _expect_error(bare, "does not accept input of shape 3x28x28", input_shape=(3, 28, 28))
    # adaptive pooling: another H x W with the right channel count is fine
    assert load_model(ts, input_shape=(1, 20, 36)).num_classes == 10


def test_bad_outputs(tmp_path):
    for name, module, needle in (
        ("flat.pt", _Flat(), r"N x K logits, got \(2,\)"),
        ("one.pt", _One(), "outputs 1 logit"),
        ("nan.pt", _NaN(), "non-finite"),
    ):
        path = tmp_path / name
        torch.jit.save(torch.jit.script(module), str(path))
        _expect_error(path, needle, input_shape=(1, 4, 4))
    three = tmp_path / "three.pt"
    torch.jit.save(torch.jit.script(_Three()), str(three))
    assert load_model(three, input_shape=(1, 4, 4), num_classes=3).num_classes == 3
    _expect_error(three, "outputs 3 logits but the data has 5 classes", input_shape=(1, 4, 4), num_classes=5)
    # a model with more logits than the data's classes is accepted
    assert load_model(three, input_shape=(1, 4, 4), num_classes=2).num_classes == 3


def test_never_unpickles(tmp_path):
    """A pickled (torch.save) checkpoint is refused, not executed."""
    path = tmp_path / "pickled.pt"
    torch.save(_model("small_cnn", 1, 10, 4), str(path))  # a zip archive holding a pickle
    _expect_error(path, r"refused: a pickled checkpoint .*model\.allow_pickle=true", input_shape=(1, 28, 28))
