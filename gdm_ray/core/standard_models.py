"""Standard architectures with the parameter names of their common implementations,
so a user's state dict (safetensors, or a weights-only ``torch.save``) loads as it is:

- ``preact_resnet18``: BackdoorBench's / kuangliu's CIFAR PreAct-ResNet18
  (``conv1``, ``layerN.M.{bn1,conv1,bn2,conv2,shortcut.0}``, ``linear``);
- ``vgg16_bn``: torchvision's VGG-16-BN (``features.N``, ``classifier.{0,3,6}``),
  or the CIFAR variant with one linear head (``classifier.weight``: kuangliu's);
- ``mobilenet_v2``: torchvision's MobileNetV2 (``features.N.conv...``, ``classifier.1``);
- ``vit``: torchvision's VisionTransformer (``conv_proj``, ``class_token``,
  ``encoder.pos_embedding``, ``encoder.layers.encoder_layer_N...``, ``heads.head``), any size.

Any input size and number of classes (pooling is adaptive; a ViT's positional
embedding fixes its image size, checked at load). :func:`infer_kwargs` reads the
sizes a checkpoint was made with from its tensor shapes. These nets expect the
inputs their trainers fed them; ``normalize`` (mean/std, per channel) puts that
normalisation inside the model, as the model contract wants ([0, 1] images in).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gdm_ray.core.errors import ModelLoadError

__all__ = ["PreActResNet18", "VGG16BN", "MobileNetV2", "ViT", "STANDARD_ARCHS", "infer_kwargs", "Normalized"]


class Normalized(nn.Module):
    """(x - mean) / std in front of a network (the checkpoint's own keys stay under ``net.``-free names)."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("norm_mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("norm_std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.norm_mean) / self.norm_std)


# --- PreAct-ResNet18 -------------------------------------------------------------------


class _PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False)) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x  # the shortcut sees the pre-activation
        out = self.conv2(torch.relu(self.bn2(self.conv1(out))))
        return out + skip


class PreActResNet18(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        cin, layers = width, []
        for mult, stride in ((1, 1), (2, 2), (4, 2), (8, 2)):
            cout = width * mult
            layers.append(nn.Sequential(_PreActBlock(cin, cout, stride), _PreActBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return self.linear(torch.flatten(self.avgpool(out), 1))


# --- VGG-16-BN ---------------------------------------------------------------------------

_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG16BN(nn.Module):
    """torchvision's layout; ``cifar_head``: one Linear(512, K) after a global pool (kuangliu's CIFAR VGG)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, cifar_head: bool = False, hidden: int = 4096) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))  # ceil: small inputs (28x28) keep a 1x1 map
            else:
                layers += [nn.Conv2d(cin, int(v), 3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
                cin = int(v)
        self.features = nn.Sequential(*layers)
        self.cifar_head = cifar_head
        if cifar_head:
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.classifier: nn.Module = nn.Linear(512, num_classes)
        else:
            self.avgpool = nn.AdaptiveAvgPool2d(7)
            self.classifier = nn.Sequential(
                nn.Linear(512 * 49, hidden), nn.ReLU(True), nn.Dropout(0.5), nn.Linear(hidden, hidden), nn.ReLU(True),
                nn.Dropout(0.5), nn.Linear(hidden, num_classes),
            )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# --- MobileNetV2 ---------------------------------------------------------------------------


def _conv_bn_act(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU6(True))


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = [] if expand == 1 else [_conv_bn_act(cin, hidden, 1)]
        layers += [_conv_bn_act(hidden, hidden, 3, stride, hidden), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2 (width 1.0). ``stem_stride`` 1 is the usual change for 32x32 inputs."""

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, in_channels: int = 3, num_classes: int = 10, stem_stride: int = 2, dropout: float = 0.2) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn_act(in_channels, 32, 3, stem_stride)]
        cin = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(_InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_conv_bn_act(cin, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


# --- ViT -----------------------------------------------------------------------------------


class _EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Dropout(0.0), nn.Linear(mlp, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.self_attention(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _Encoder(nn.Module):
    def __init__(self, seq: int, depth: int, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq, dim).normal_(std=0.02))
        self.layers = nn.Sequential()
        for i in range(depth):
            self.layers.add_module(f"encoder_layer_{i}", _EncoderBlock(dim, heads, mlp))
        self.ln = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.layers(x + self.pos_embedding))


class ViT(nn.Module):
    """torchvision's VisionTransformer layout; the defaults are a small ViT for 32x32 images."""

    def __init__(
        self, in_channels: int = 3, num_classes: int = 10, image_size: Sequence[int] = (32, 32), patch: int = 4, dim: int = 192,
        depth: int = 6, heads: int = 3, mlp: int = 384,
    ) -> None:  # fmt: skip
        super().__init__()
        h, w = (int(image_size[0]), int(image_size[-1]))
        if h % patch or w % patch:
            raise ModelLoadError(f"vit: image {h}x{w} is not a whole number of {patch}x{patch} patches")
        if dim % heads:
            raise ModelLoadError(f"vit: width {dim} does not split into {heads} heads (arch.heads=...)")
        self.patch = patch
        self.conv_proj = nn.Conv2d(in_channels, dim, patch, patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.encoder = _Encoder((h // patch) * (w // patch) + 1, depth, dim, heads, mlp)
        self.heads = nn.Sequential()
        self.heads.add_module("head", nn.Linear(dim, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x).flatten(2).transpose(1, 2)  # N x patches x dim
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], 1)
        return self.heads(self.encoder(x)[:, 0])


STANDARD_ARCHS: dict[str, type[nn.Module]] = {
    "preact_resnet18": PreActResNet18,
    "vgg16_bn": VGG16BN,
    "mobilenet_v2": MobileNetV2,
    "vit": ViT,
}


def _shape(state: dict[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise ModelLoadError(f"missing key {key!r}")
    return tuple(state[key].shape)


def infer_kwargs(arch: str, state: dict[str, torch.Tensor], input_shape: Sequence[int]) -> dict:
    """The constructor arguments a checkpoint of ``arch`` was made with, read from its tensor shapes
    (num_classes included); raises ModelLoadError("missing key ...") when a key it needs is absent."""
    c, h, w = (int(v) for v in input_shape)
    if arch == "preact_resnet18":
        return {"in_channels": c, "num_classes": _shape(state, "linear.weight")[0], "width": _shape(state, "conv1.weight")[0]}
    if arch == "vgg16_bn":
        if "classifier.weight" in state:
            return {"in_channels": c, "num_classes": _shape(state, "classifier.weight")[0], "cifar_head": True}
        out, hidden = _shape(state, "classifier.6.weight")
        return {"in_channels": c, "num_classes": out, "hidden": hidden}
    if arch == "mobilenet_v2":
        return {"in_channels": c, "num_classes": _shape(state, "classifier.1.weight")[0]}
    if arch == "vit":
        dim, _, patch, _ = _shape(state, "conv_proj.weight")
        depth = len({k.split(".")[2] for k in state if k.startswith("encoder.layers.")})
        mlp = _shape(state, "encoder.layers.encoder_layer_0.mlp.0.weight")[0]
        seq = _shape(state, "encoder.pos_embedding")[1]
        if (h // patch) * (w // patch) + 1 != seq:
            raise ModelLoadError(f"vit: the checkpoint's {seq - 1} patches do not fit {h}x{w} images in {patch}x{patch} patches")
        heads = max(1, dim // 64) if dim >= 64 else 1
        num_classes = _shape(state, "heads.head.weight")[0]
        return dict(in_channels=c, num_classes=num_classes, image_size=(h, w), patch=patch, dim=dim, depth=depth, heads=heads, mlp=mlp)
    raise ModelLoadError(f"unknown standard architecture {arch!r}")
