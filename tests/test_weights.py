"""Weights without code: standard architectures from users' state dicts, key maps, and pickles refused unless trusted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from gdm_ray.core.errors import ModelLoadError
from gdm_ray.core.model_io import LoadOptions, load_model, save_like
from gdm_ray.core.program import ProgramModule
from gdm_ray.core.standard_models import STANDARD_ARCHS

# (arch, constructor kwargs, input shape): sizes people use, kept small enough for a test
CASES = [
    ("preact_resnet18", {"width": 8}, (3, 32, 32)),
    ("preact_resnet18", {"width": 8, "in_channels": 1}, (1, 28, 28)),
    ("vgg16_bn", {"cifar_head": True}, (3, 32, 32)),
    ("vgg16_bn", {"hidden": 64}, (1, 28, 28)),  # torchvision's head, a small hidden size (read from the shapes)
    ("mobilenet_v2", {}, (3, 32, 32)),
    ("vit", {"image_size": (32, 32), "patch": 8, "dim": 64, "depth": 2, "heads": 1, "mlp": 128}, (3, 32, 32)),
]


def _net(arch: str, kwargs: dict, shape, classes: int = 7) -> nn.Module:
    torch.manual_seed(0)
    net = STANDARD_ARCHS[arch](**{"in_channels": shape[0], "num_classes": classes, **kwargs})
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def _x(shape, n: int = 3) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(5))


def _state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}


@pytest.mark.parametrize(("arch", "kwargs", "shape"), CASES, ids=[f"{c[0]}-{c[2][0]}x{c[2][1]}" for c in CASES])
@pytest.mark.parametrize("container", ["safetensors", "state_dict", "nested", "dataparallel"])
def test_a_users_state_dict_loads_into_the_standard_architecture(tmp_path, arch, kwargs, shape, container):
    net = _net(arch, kwargs, shape)
    state = _state(net)
    if container == "safetensors":  # a bare file: no gdm-ray header, the arch named on the command line
        path = tmp_path / "w.safetensors"
        save_file(state, str(path))
    else:
        path = tmp_path / "w.pth"
        obj = {
            "state_dict": state,
            "nested": {"epoch": 3, "state_dict": state, "best_acc": 0.9},
            "dataparallel": {f"module.{k}": v for k, v in state.items()},
        }.get(container, state)
        torch.save(obj, path)
    loaded = load_model(path, shape, 7, options=LoadOptions(arch=arch))
    assert loaded.num_classes == 7 and loaded.meta["arch"] == arch
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(_x(shape)), net(_x(shape)))
    out = save_like(loaded.module, tmp_path / "model", loaded.meta, shape)  # the format it came in
    assert out.suffix == (".safetensors" if container == "safetensors" else ".pth")
    again = load_model(out, shape, 7, options=LoadOptions(arch=arch))
    with torch.no_grad():
        torch.testing.assert_close(again.module(_x(shape)), net(_x(shape)))


def test_key_map_renames_and_the_error_names_the_first_missing_key(tmp_path):
    net = _net("preact_resnet18", {"width": 8}, (3, 32, 32))
    path = tmp_path / "w.pth"
    torch.save({f"backbone.{k}": v for k, v in _state(net).items()}, path)
    want = r"missing key 'conv1\.weight' \(and \d+ more\).*unexpected key 'backbone\.conv1\.weight'"
    with pytest.raises(ModelLoadError, match=want) as err:
        load_model(path, (3, 32, 32), 7, options=LoadOptions(arch="preact_resnet18"))
    assert "\n" not in str(err.value) and "model.key_map" in str(err.value)
    loaded = load_model(path, (3, 32, 32), 7, options=LoadOptions(arch="preact_resnet18", key_map=("backbone.=",)))
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(_x((3, 32, 32))), net(_x((3, 32, 32))))


def test_weights_of_another_architecture_are_one_line(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(_state(_net("mobilenet_v2", {}, (3, 32, 32))), path)
    with pytest.raises(ModelLoadError, match="do not fit arch 'preact_resnet18'") as err:
        load_model(path, (3, 32, 32), 7, options=LoadOptions(arch="preact_resnet18"))
    assert "\n" not in str(err.value)
    with pytest.raises(ModelLoadError, match="names no architecture; pass arch=NAME"):
        load_model(path, (3, 32, 32), 7)


def test_a_vit_checkpoint_for_another_image_size_is_refused(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(_state(_net(*CASES[-1][:2], (3, 32, 32))), path)
    with pytest.raises(ModelLoadError, match="patches do not fit 64x64 images"):
        load_model(path, (3, 64, 64), 7, options=LoadOptions(arch="vit"))


def test_normalisation_lives_inside_the_model_and_travels_in_the_header(tmp_path):
    net = _net("preact_resnet18", {"width": 8}, (3, 32, 32))
    path = tmp_path / "w.safetensors"
    save_file(_state(net), str(path))
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    loaded = load_model(path, (3, 32, 32), 7, options=LoadOptions(arch="preact_resnet18", mean=mean, std=std))
    x = _x((3, 32, 32))
    want = net((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), want)
    out = save_like(loaded.module, tmp_path / "model", loaded.meta, (3, 32, 32))
    again = load_model(out, (3, 32, 32), 7)  # arch, mean and std come from the header now
    assert again.meta["mean"] == pytest.approx(list(mean))
    with torch.no_grad():
        torch.testing.assert_close(again.module(x), want)


class Sneaky(nn.Module):
    """A pickled whole model whose unpickling has a side effect (as malicious code would)."""

    canary: Path | None = None

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if Sneaky.canary is not None:
            Sneaky.canary.write_text("ran")


def test_a_pickled_model_is_refused_and_loaded_once_converted_when_trusted(tmp_path, capsys):
    torch.manual_seed(0)
    model = Sneaky().eval()
    path = tmp_path / "model.pt"  # TrojAI's layout: torch.save of the whole module
    torch.save(model, path)
    Sneaky.canary = tmp_path / "canary"
    try:
        with pytest.raises(ModelLoadError, match=r"refused: a pickled checkpoint.*model\.allow_pickle=true") as err:
            load_model(path, (1, 8, 8), 3)
        assert "\n" not in str(err.value)
        assert not Sneaky.canary.exists(), "refusing must not unpickle"
        opts = LoadOptions(allow_pickle=True, cache_dir=str(tmp_path / "cache"))
        loaded = load_model(path, (1, 8, 8), 3, options=opts)
        assert Sneaky.canary.exists() and "unpickling a checkpoint" in capsys.readouterr().err
        assert isinstance(loaded.module, ProgramModule) and loaded.meta["converted_program"].endswith(".pt2")
        x = torch.rand(5, 1, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(loaded.module(x), model(x))
        Sneaky.canary.unlink()
        load_model(path, (1, 8, 8), 3, options=opts)  # the cached program: no second unpickle
        assert not Sneaky.canary.exists()
    finally:
        Sneaky.canary = None


def _cli(args: list[str], capsys) -> tuple[int, str]:
    from gdm_ray.cli.main import main

    code = main(args)
    return code, capsys.readouterr().err


def test_the_cli_reads_a_state_dict_with_arch_and_refuses_a_pickle_until_trusted(tmp_path, capsys, monkeypatch):
    """`gdm-ray evaluate` on a users' PreAct-ResNet18 state dict (arch=), then on a pickled whole model."""
    monkeypatch.setenv("GDM_RAY_CACHE", str(tmp_path / "cache"))
    net = _net("preact_resnet18", {"width": 8, "in_channels": 1}, (1, 16, 16), classes=4)
    torch.save(_state(net), tmp_path / "w.pth")
    base = ["evaluate", "data=synthetic", "trigger=bw3x3", "target_class=0", "progress=false", "threads=1"]
    code, err = _cli([*base, f"model={tmp_path / 'w.pth'}", "arch=preact_resnet18", f"out={tmp_path / 'e1'}"], capsys)
    assert code == 0, err
    code, err = _cli([*base, f"model={tmp_path / 'w.pth'}", f"out={tmp_path / 'e2'}"], capsys)
    assert code != 0 and "pass arch=NAME" in err and not (tmp_path / "e2").exists()
    torch.save(net, tmp_path / "whole.pt")
    code, err = _cli([*base, f"model={tmp_path / 'whole.pt'}", f"out={tmp_path / 'e3'}"], capsys)
    assert code != 0 and "model.allow_pickle=true" in err and not (tmp_path / "e3").exists()
    code, err = _cli([*base, f"model={tmp_path / 'whole.pt'}", "model.allow_pickle=true", f"out={tmp_path / 'e4'}"], capsys)
    assert code == 0, err
    assert list((tmp_path / "cache" / "models" / "converted").glob("*.pt2"))
