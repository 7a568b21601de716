"""Save and load classifiers without unpickling untrusted files.

Three formats (DESIGN.md section 3, "Models"):
- TorchScript (``torch.jit.save``), with a small JSON description stored as
  an extra file inside the archive;
- torch.export programs (``.pt2``, TorchScript's successor), checked before
  and after torch reads them (gdm_ray.core.program) and retrainable;
- a known architecture name + a safetensors state dict, the architecture and
  its arguments in the safetensors metadata header.
A repaired model is written in the format it came in (:func:`save_like`).

Loading checks what it can (readable, a known format, accepts the input
shape, returns N x K finite logits) and raises ModelLoadError with one line
naming the file and the problem.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gdm_ray.core.atomic import atomic_target, publish
from gdm_ray.core.errors import ModelLoadError
from gdm_ray.core.program import is_program_archive, load_program, save_program
from gdm_ray.core.standard_models import Normalized
from gdm_ray.core.weights import KNOWN_ARCHS, LoadOptions, build_from_state, is_checkpoint_zip, load_checkpoint, zip_names

__all__ = [
    "LoadedModel",
    "LoadOptions",
    "save_torchscript",
    "save_safetensors",
    "save_program",
    "save_like",
    "shipped_file",
    "load_model",
    "load_model_bytes",
    "file_sha256",
    "MODEL_SUFFIXES",
    "clone_model",
]

META_NAME = "gdm_ray.json"
MODEL_SUFFIXES = (".pt", ".pth", ".pt2", ".ts", ".jit", ".torchscript", ".safetensors")
# the file a repaired model is written to, by the format it came in
SUFFIX_OF = {"torchscript": ".pt", "program": ".pt2", "safetensors": ".safetensors", "state_dict": ".pth"}


@dataclass
class LoadedModel:
    module: nn.Module
    input_shape: tuple[int, int, int] | None
    num_classes: int
    path: str
    sha256: str
    meta: dict


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_torchscript(model: nn.Module, path: str | Path, input_shape: tuple[int, int, int], meta: dict | None = None) -> Path:
    """Script (or, failing that, trace) the model and save it atomically."""
    was_training = model.training
    model.eval()
    try:
        try:
            scripted = torch.jit.script(model)
        except Exception:  # noqa: BLE001 - some modules only trace
            scripted = torch.jit.trace(model, torch.zeros(1, *input_shape, device=_device(model)))
    finally:
        model.train(was_training)
    info = {"input_shape": list(input_shape), **(meta or {})}
    final, tmp = atomic_target(Path(path))
    try:
        torch.jit.save(scripted.cpu(), str(tmp), _extra_files={META_NAME: json.dumps(info)})
        publish(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def save_safetensors(
    model: nn.Module, path: str | Path, arch: str, input_shape: tuple[int, int, int], num_classes: int, width: int | None = None
) -> Path:
    """Save a state dict with the architecture description (and any input normalisation) in the header."""
    from safetensors.torch import save_file

    if arch not in KNOWN_ARCHS:
        raise ModelLoadError(f"cannot save arch {arch!r}: not one of {', '.join(KNOWN_ARCHS)}")
    net, norm = _unwrap(model)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    meta = {
        "arch": arch,
        "input_shape": json.dumps(list(input_shape)),
        "num_classes": str(num_classes),
        "width": "" if width is None else str(width),
        **({"mean": json.dumps(norm[0]), "std": json.dumps(norm[1])} if norm else {}),
    }
    final, tmp = atomic_target(Path(path))
    try:
        save_file(state, str(tmp), metadata=meta)
        publish(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def _unwrap(model: nn.Module) -> tuple[nn.Module, tuple[list[float], list[float]] | None]:
    """A Normalized wrapper's network and its mean/std (the checkpoint's keys are the network's)."""
    if isinstance(model, Normalized):
        return model.net, (model.norm_mean.flatten().tolist(), model.norm_std.flatten().tolist())
    return model, None


def shipped_file(loaded: LoadedModel) -> Path:
    """The file to hand to jobs for ``loaded``: a trusted pickle's safe copy (jobs never unpickle), else the file itself."""
    return Path(loaded.meta.get("converted_program") or loaded.path)


def save_like(model: nn.Module, stem: str | Path, loaded_meta: dict, input_shape: tuple[int, int, int], meta: dict | None = None) -> Path:
    """Write ``model`` in the format its original came in (``loaded_meta["format"]``):
    TorchScript in, TorchScript out; .pt2 in, .pt2 out; safetensors of a known
    architecture in, safetensors out. ``stem`` gains the format's suffix."""
    fmt = loaded_meta.get("format", "torchscript")
    path = Path(f"{stem}{SUFFIX_OF.get(fmt, '.pt')}")
    if fmt == "safetensors":
        arch, classes = loaded_meta["arch"], int(loaded_meta["num_classes"])
        return save_safetensors(model, path, arch, input_shape, classes, loaded_meta.get("width"))
    if fmt not in ("program", "state_dict"):
        return save_torchscript(model, path, input_shape, meta)
    buf = io.BytesIO()  # written to a buffer: torch.export.save wants a .pt2 name, not the temporary file's
    if fmt == "program":
        save_program(copy.deepcopy(model).cpu(), buf, input_shape, meta or {})
    else:  # a weights-only checkpoint in, one out (tensors only: loadable with weights_only=True)
        torch.save({k: v.detach().cpu() for k, v in _unwrap(model)[0].state_dict().items()}, buf)
    final, tmp = atomic_target(path)
    try:
        tmp.write_bytes(buf.getvalue())
        publish(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def clone_model(model: nn.Module) -> nn.Module:
    """An independent, trainable copy. ``copy.deepcopy`` of a ScriptModule
    gives non-leaf parameters that no optimizer accepts, so TorchScript
    round-trips through memory instead."""
    if isinstance(model, torch.jit.ScriptModule):
        buf = io.BytesIO()
        torch.jit.save(model, buf)
        buf.seek(0)
        return torch.jit.load(buf, map_location=_device(model))
    return copy.deepcopy(model)


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def load_model_bytes(
    blob: bytes,
    name: str,
    input_shape: tuple[int, int, int] | None = None,
    num_classes: int | None = None,
    arch: str | None = None,
    device: str | torch.device = "cpu",
    options: LoadOptions | None = None,
) -> LoadedModel:
    """``load_model`` for a model file's bytes: a Ray worker on another node
    gets the file through the object store, not a shared file system.
    ``name`` is the original path, kept as the model's path."""
    with tempfile.TemporaryDirectory(prefix="gdm-ray-model-") as tmp:
        p = Path(tmp) / Path(name).name
        p.write_bytes(blob)
        loaded = load_model(p, input_shape, num_classes, arch, device, options)
    loaded.path = name
    return loaded


def load_model(
    path: str | Path,
    input_shape: tuple[int, int, int] | None = None,
    num_classes: int | None = None,
    arch: str | None = None,
    device: str | torch.device = "cpu",
    options: LoadOptions | None = None,
) -> LoadedModel:
    """Load and check a classifier file.

    input_shape: C x H x W the caller will feed (checked by a forward pass);
    num_classes: the number of classes the data has (the model must output at
    least that many logits). ``arch`` (or ``options.arch``) is only needed for
    a state dict whose file does not name its architecture; ``options`` says
    how to read weights (key renames, normalisation) and whether a pickled
    checkpoint may be unpickled (gdm_ray.core.weights).
    """
    opts = options or LoadOptions()
    if arch and not opts.arch:
        opts = dataclasses.replace(opts, arch=arch)
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"model={p}: no such file")
    try:
        with open(p, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise ModelLoadError(f"model={p}: cannot read ({exc.strerror})") from None
    if head[:4] == b"PK\x03\x04" and is_program_archive(p):
        module, meta = load_program(p, device)
    elif head[:4] == b"PK\x03\x04" and is_checkpoint_zip(zip_names(p)):
        module, meta = load_checkpoint(p, opts, input_shape, num_classes, device)
    elif head[:4] == b"PK\x03\x04":
        module, meta = _load_torchscript(p, device)
    elif head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):  # a legacy (non-zip) torch.save pickle
        module, meta = load_checkpoint(p, opts, input_shape, num_classes, device)
    elif len(head) == 8 and 0 < int.from_bytes(head, "little") < 100_000_000:
        module, meta = _load_safetensors(p, opts, input_shape, num_classes, device)
    else:
        raise ModelLoadError(
            f"model={p}: neither a TorchScript archive, a torch.export program (.pt2), a torch.save checkpoint nor a safetensors file"
        )
    module.eval()
    recorded = meta.get("input_shape")
    if input_shape is not None and recorded and int(recorded[0]) != int(input_shape[0]):
        rs, cs = "x".join(map(str, recorded)), "x".join(map(str, input_shape))
        raise ModelLoadError(f"model={p}: made for {rs} images ({recorded[0]} channels), but the data is {cs}")
    shape = tuple(input_shape) if input_shape is not None else (tuple(meta["input_shape"]) if meta.get("input_shape") else None)
    k = _check_forward(p, module, shape, device)
    if num_classes is not None and k < num_classes:
        raise ModelLoadError(f"model={p}: outputs {k} logits but the data has {num_classes} classes")
    return LoadedModel(module, shape, k, str(p), file_sha256(p), meta)  # type: ignore[arg-type]


def _load_torchscript(p: Path, device: str | torch.device) -> tuple[nn.Module, dict]:
    extra = {META_NAME: ""}
    try:
        module = torch.jit.load(str(p), map_location=device, _extra_files=extra)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for corrupt archives
        raise ModelLoadError(f"model={p}: corrupt or unreadable TorchScript ({_first_line(exc)})") from None
    try:
        meta = json.loads(extra[META_NAME]) if extra[META_NAME] else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        meta = {}
    meta.setdefault("format", "torchscript")
    return module, meta


def _load_safetensors(
    p: Path, opts: LoadOptions, input_shape: tuple[int, int, int] | None, num_classes: int | None, device: str | torch.device
) -> tuple[nn.Module, dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            header = f.metadata() or {}
        state = load_file(str(p), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"model={p}: corrupt safetensors file ({_first_line(exc)})") from None
    try:  # what the header records wins over the caller's guesses: it was written with the weights
        shape = json.loads(header["input_shape"]) if header.get("input_shape") else input_shape
        classes = int(header["num_classes"]) if header.get("num_classes") else num_classes
        width = int(header["width"]) if header.get("width") else opts.width
        mean = json.loads(header["mean"]) if header.get("mean") else opts.mean
        std = json.loads(header["std"]) if header.get("std") else opts.std
    except (ValueError, json.JSONDecodeError):
        raise ModelLoadError(f"model={p}: malformed safetensors metadata {header}") from None
    if shape is not None and input_shape is not None and int(shape[0]) != int(input_shape[0]):
        rs, cs = "x".join(map(str, shape)), "x".join(map(str, input_shape))
        raise ModelLoadError(f"model={p}: made for {rs} images ({shape[0]} channels), but the data is {cs}")
    arch = header.get("arch") or opts.arch
    opts = dataclasses.replace(opts, arch=arch, width=width, mean=mean, std=std)
    module, meta = build_from_state(p, state, opts, tuple(shape) if shape else None, classes, "safetensors")
    return module.to(device), meta


def _check_forward(p: Path, module: nn.Module, shape: tuple[int, ...] | None, device: str | torch.device) -> int:
    if shape is None:
        raise ModelLoadError(f"model={p}: input shape unknown; the file records none and no data was given")
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0)).to(device)
    try:
        with torch.no_grad():
            out = module(x)
    except Exception as exc:  # noqa: BLE001 - any failure here means the shape is wrong
        cs = "x".join(str(s) for s in shape)
        raise ModelLoadError(f"model={p}: does not accept input of shape {cs} ({_first_line(exc)})") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelLoadError(f"model={p}: output must be N x K logits, got {got} for a batch of 2")
    if out.shape[1] < 2:
        raise ModelLoadError(f"model={p}: outputs {out.shape[1]} logit(s); a classifier needs at least 2")
    if not torch.isfinite(out).all():
        raise ModelLoadError(f"model={p}: produces non-finite logits")
    return int(out.shape[1])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]
