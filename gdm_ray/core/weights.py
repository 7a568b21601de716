"""Weights without code: state dicts (safetensors, weights-only ``torch.save``
checkpoints) built into a known architecture, and pickled checkpoints, which
are refused unless the user trusts the file.

A state dict loads into gdm-ray's own architectures (gdm_ray.core.models) or
the standard ones (gdm_ray.core.standard_models), whose sizes are read from
the tensors' shapes. ``key_map`` renames key prefixes first ("old=new", in
order; "module.=" drops DataParallel's prefix, which is also dropped when
every key has it); a key still missing or unexpected is named in the error.

A pickled checkpoint (a whole module, as TrojAI ships them) runs code when
unpickled. With ``allow_pickle`` (the user's word that the file is trusted)
it is unpickled once, exported to a ``.pt2`` program in the cache (keyed by
the file's SHA-256, so later runs read the program, not the pickle) and
read through the program loader like any .pt2.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import sys
import tempfile
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gdm_ray.core.atomic import atomic_target, publish
from gdm_ray.core.errors import ModelLoadError
from gdm_ray.core.models import ARCHS, build_model
from gdm_ray.core.program import save_program
from gdm_ray.core.standard_models import STANDARD_ARCHS, Normalized, infer_kwargs

__all__ = ["LoadOptions", "build_from_state", "load_checkpoint", "is_checkpoint_zip", "trusted_program", "zip_names", "KNOWN_ARCHS"]

KNOWN_ARCHS = (*ARCHS, *STANDARD_ARCHS)
# the keys trainers commonly nest a state dict under in a checkpoint
_NESTED = ("state_dict", "model_state_dict", "model", "net", "state", "weights")


@dataclass(frozen=True)
class LoadOptions:
    """How to read a model file beyond what the file says about itself."""

    arch: str | None = None  # the architecture of a bare state dict (a known name)
    width: int | None = None  # gdm-ray's own architectures only
    key_map: tuple[str, ...] = ()  # "old=new" key-prefix renames, in order
    mean: tuple[float, ...] | None = None  # the input normalisation the weights were trained with
    std: tuple[float, ...] | None = None
    allow_pickle: bool = False  # the user trusts the file: a pickled checkpoint may be unpickled (once)
    cache_dir: str | None = None  # where a trusted pickle's .pt2 conversion is kept


def is_checkpoint_zip(names: list[str]) -> bool:
    """A torch.save zip (data.pkl, no TorchScript code)."""
    return any(n.endswith("/data.pkl") or n == "data.pkl" for n in names) and not any("/code/" in n for n in names)


def _rename(p: Path, state: dict[str, torch.Tensor], key_map: tuple[str, ...]) -> dict[str, torch.Tensor]:
    for rule in key_map:
        if "=" not in rule:
            raise ModelLoadError(f"model={p}: model.key_map entry {rule!r} must be old=new (a key prefix and its replacement)")
        old, new = rule.split("=", 1)
        state = {(new + k[len(old) :] if k.startswith(old) else k): v for k, v in state.items()}
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _check_keys(p: Path, arch: str, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    want, have = list(module.state_dict()), set(state)
    missing = [k for k in want if k not in have and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in set(want)]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing key {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        if unexpected:
            parts.append(f"unexpected key {unexpected[0]!r}" + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
        hint = "; model.key_map=[old=new] renames key prefixes"
        raise ModelLoadError(f"model={p}: the weights do not fit arch {arch!r}: {', '.join(parts)}{hint}")


def build_from_state(
    p: Path,
    state: dict[str, torch.Tensor],
    opts: LoadOptions,
    input_shape: tuple[int, int, int] | None,
    num_classes: int | None,
    fmt: str,
) -> tuple[nn.Module, dict]:
    """A module of ``opts.arch`` holding ``state`` (renamed by ``opts.key_map``), checked key by key."""
    arch = opts.arch
    if not arch:
        raise ModelLoadError(f"model={p}: a state dict names no architecture; pass arch=NAME ({', '.join(KNOWN_ARCHS)})")
    if arch not in KNOWN_ARCHS:
        raise ModelLoadError(f"model={p}: unknown architecture {arch!r} (known: {', '.join(KNOWN_ARCHS)})")
    if input_shape is None:
        raise ModelLoadError(f"model={p}: input shape unknown; the file records none and no data was given")
    state = _rename(p, {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, opts.key_map)
    meta: dict[str, Any] = {"format": fmt, "arch": arch, "input_shape": list(input_shape)}
    if arch in STANDARD_ARCHS:
        try:
            kwargs = infer_kwargs(arch, state, input_shape)
        except ModelLoadError as exc:  # name the keys that differ from a default-sized net's, not only the first one looked up
            if str(exc).startswith("missing key"):
                _check_keys(p, arch, STANDARD_ARCHS[arch](in_channels=int(input_shape[0])), state)
            raise ModelLoadError(f"model={p}: the weights do not fit arch {arch!r}: {exc}; model.key_map=[old=new] renames keys") from None
        module = STANDARD_ARCHS[arch](**kwargs)
        meta.update(num_classes=int(kwargs["num_classes"]))
    else:
        if num_classes is None:
            raise ModelLoadError(f"model={p}: the number of classes is unknown; the file records none and no data was given")
        module = build_model(arch, int(input_shape[0]), int(num_classes), opts.width)
        meta.update(num_classes=int(num_classes), width=opts.width)
    _check_keys(p, arch, module, state)
    try:
        module.load_state_dict(state, strict=False)  # keys checked above; num_batches_tracked may be absent
    except RuntimeError as exc:
        text = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc).splitlines()[0])
        raise ModelLoadError(f"model={p}: the weights do not fit arch {arch!r} ({text[:200]})") from None
    if opts.mean is not None or opts.std is not None:
        c = int(input_shape[0])
        mean, std = tuple(opts.mean or (0.0,) * c), tuple(opts.std or (1.0,) * c)
        if len(mean) != c or len(std) != c or any(s <= 0 for s in std):
            raise ModelLoadError(f"model={p}: arch.mean={list(mean)} / arch.std={list(std)} need {c} values each, std > 0")
        module = Normalized(module, mean, std)
        meta.update(mean=list(mean), std=list(std))
    return module, meta


def _unnest(obj: Any) -> dict[str, torch.Tensor] | None:
    """The state dict in a checkpoint: the object itself, or under one of the usual keys."""
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, dict):
        for key in _NESTED:
            inner = _unnest(obj.get(key))
            if inner is not None:
                return inner
    return None


def load_checkpoint(
    p: Path, opts: LoadOptions, input_shape: tuple[int, int, int] | None, num_classes: int | None, device: str | torch.device
) -> tuple[nn.Module, dict]:
    """A torch.save file: a state dict loads weights-only; a pickled module only with allow_pickle (converted once to .pt2)."""
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, ModuleNotFoundError) as exc:
        if not opts.allow_pickle:
            why = str(exc).strip().splitlines()
            detail = next((line.strip() for line in why if "GLOBAL" in line or "Unsupported" in line), why[0] if why else "")
            raise ModelLoadError(
                f"model={p}: refused: a pickled checkpoint holding Python objects ({detail[:120]}); unpickling it would run "
                "code from the file. If you trust it, pass model.allow_pickle=true (it is converted once to a .pt2 program)"
            ) from None
        return _trusted_pickle(p, opts, input_shape, num_classes, device)
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt archives raise many types
        raise ModelLoadError(f"model={p}: corrupt or unreadable checkpoint ({str(exc).strip()[:160]})") from None
    state = _unnest(obj)
    if state is None:
        raise ModelLoadError(f"model={p}: the checkpoint holds no state dict (a dict of tensors, or one under {', '.join(_NESTED)})")
    module, meta = build_from_state(p, state, opts, input_shape, num_classes, "state_dict")
    return module.to(device), meta


def _pickle_head(p: Path) -> bool:
    """A torch.save file: a zip holding data.pkl, or a legacy (non-zip) pickle."""
    with open(p, "rb") as f:
        head = f.read(4)
    if head[:4] == b"PK\x03\x04":
        return is_checkpoint_zip(zip_names(p))
    return head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")


def zip_names(p: Path) -> list[str]:
    try:
        with zipfile.ZipFile(p) as z:
            return z.namelist()
    except (zipfile.BadZipFile, OSError):
        return []


def trusted_program(p: Path, opts: LoadOptions, input_shape: tuple[int, int, int] | None, refused: bool = False) -> Path | None:
    """For a checkpoint that only unpickling can read (allow_pickle: the user trusts it), the safe copy
    made of it once in the cache: a .pt2 program of a pickled module, or a tensors-only .pth of a state
    dict stored beside Python objects. None for a file that needs no unpickling."""
    if not refused:  # ``refused``: the caller's weights-only load already failed; do not read it again
        if not _pickle_head(p):
            return None
        try:
            torch.load(p, map_location="cpu", weights_only=True)
            return None
        except Exception:  # noqa: BLE001 - the weights-only unpickler refused it: only a full unpickle reads it
            pass
    sha = hashlib.sha256(p.read_bytes()).hexdigest()
    root = Path(opts.cache_dir or Path(tempfile.gettempdir()) / "gdm-ray") / "converted"
    for done in (root / f"{sha}.pt2", root / f"{sha}.pth"):
        if done.is_file():
            return done
    if input_shape is None:
        raise ModelLoadError(f"model={p}: input shape unknown, needed to convert the pickled model; give the data")
    if not opts.allow_pickle:  # the one full unpickle in gdm-ray: only on the user's word that the file is trusted
        raise ModelLoadError(f"model={p}: only unpickling reads this checkpoint; pass model.allow_pickle=true if you trust it")
    print(f"gdm-ray: WARNING: model={p}: unpickling a checkpoint (model.allow_pickle=true: you trust this file); "
          f"converting it once into {root}", file=sys.stderr)  # fmt: skip
    try:
        obj = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"model={p}: cannot unpickle ({str(exc).strip()[:160]})") from None
    buf = io.BytesIO()
    state = _unnest(obj)
    if state is not None:  # a state dict beside other objects: keep the tensors
        torch.save(state, buf)
        out = root / f"{sha}.pth"
    elif isinstance(obj, nn.Module):
        try:
            save_program(obj.eval(), buf, input_shape, {"converted_from": str(p), "source_sha256": sha})
        except Exception as exc:  # noqa: BLE001 - torch.export raises many types for untraceable code
            raise ModelLoadError(f"model={p}: the pickled module does not export to a .pt2 program ({str(exc).strip()[:160]})") from None
        out = root / f"{sha}.pt2"
    else:
        raise ModelLoadError(f"model={p}: the pickle holds a {type(obj).__name__}, neither a module nor a state dict")
    final, tmp = atomic_target(out)  # a unique temporary name: two scans may convert the same file at once
    try:
        tmp.write_bytes(buf.getvalue())
        publish(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def _trusted_pickle(
    p: Path, opts: LoadOptions, input_shape: tuple[int, int, int] | None, num_classes: int | None, device: str | torch.device
) -> tuple[nn.Module, dict]:
    from gdm_ray.core.program import load_program

    copy = trusted_program(p, opts, input_shape, refused=True)
    assert copy is not None  # refused=True always converts (or raises)
    if copy.suffix == ".pt2":
        module, meta = load_program(copy, device)
    else:
        module, meta = load_checkpoint(copy, replace(opts, allow_pickle=False), input_shape, num_classes, device)
    meta.update(converted_from=str(p), converted_program=str(copy))
    return module, meta
