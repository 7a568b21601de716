"""torch.export programs (``.pt2``): read safely, retrain, write back.

``torch.export.load`` is not safe on an untrusted file: it unpickles weights
or constants marked ``use_pickle`` (``torch.load(weights_only=False)``,
``pickle.loads``), falls back to a full unpickle when a weights-only load of
the sample inputs fails, hands every symbolic-shape string to
``sympy.sympify`` (which evaluates Python), turns ``guards_code`` strings
into a Python function the program runs, and resolves any ``torch.*``
callable named in the graph. So an archive is checked before torch reads it
(:func:`check_archive`: one model, no pickled payload, no object constants,
no guard code, shape expressions only of sympy's own constructors), read
with every ``torch.load`` forced to weights only, and its graph checked
after (:func:`check_graph`: ATen and prims operators, and the symbolic
integer arithmetic export emits, nothing else) before it ever runs.

A loaded program is an ``fx.GraphModule`` whose ``train()`` torch refuses,
with BatchNorm's and dropout's mode baked into the graph as constants.
:class:`ProgramModule` makes it trainable: each BatchNorm node gets a marker
submodule (:class:`ProgramBatchNorm`) whose ``training`` flag, like dropout's
from the program's own, is written into the graph (and the graph
recompiled) before a forward that finds them changed. So ``model.train()``,
``model.eval()``, freezing only the BatchNorm layers, and restoring each
submodule's mode all work as on any module. A program exported for a fixed
batch size is run in chunks of that size.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import operator
import os
import re
import types
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gdm_ray.core.errors import ModelLoadError

__all__ = ["ProgramModule", "ProgramBatchNorm", "is_program_archive", "check_archive", "check_graph", "load_program", "save_program"]

META_NAME = "gdm_ray.json"  # the description gdm-ray keeps beside the program (extra_files)

# Constructors sympy's srepr writes for export's shape expressions, and their keywords.
_SYMPY_NAMES = {
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs", "floor", "ceiling",
    "FloorDiv", "CeilToInt", "FloorToInt", "CleanDiv", "PythonMod", "IntTrueDiv", "FloatTrueDiv", "TruncToInt",
    "TruncToFloat", "ToFloat", "RoundToInt", "Identity", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not",
    "positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "True", "False", "true", "false",
    "oo", "zoo", "nan", "S", "One", "Zero", "NegativeOne", "Infinity", "NegativeInfinity", "BooleanTrue", "BooleanFalse",
}  # fmt: skip
_TOKEN = re.compile(r"\s+|'[A-Za-z_][A-Za-z0-9_]*'|[A-Za-z_][A-Za-z0-9_]*|\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|[-+*/%(),=<>!]")
_SYMBOL_NAME = re.compile(r"^[a-z]+[0-9]+$")
# operator / math / torch.sym_* callables export emits for symbolic integer arithmetic
_SYM_CALLS = {
    operator.getitem, operator.eq, operator.ne, operator.le, operator.ge, operator.lt, operator.gt, operator.neg,
    operator.pos, operator.mul, operator.add, operator.sub, operator.floordiv, operator.mod, operator.pow,
    operator.truediv, operator.and_, operator.or_, math.trunc, math.ceil, math.floor,
    torch.sym_not, torch.sym_int, torch.sym_float, torch.sym_ite, torch.sym_max, torch.sym_min, torch.sym_sqrt,
}  # fmt: skip
_NAMESPACES = {"aten", "prims"}


def is_program_archive(path: str | Path) -> bool:
    """A zip whose archive_format entry says pt2 (TorchScript archives have none)."""
    try:
        with zipfile.ZipFile(path) as z:
            fmt = [n for n in z.namelist() if n.split("/")[-1] == "archive_format"]
            return bool(fmt) and z.read(fmt[0]).strip() == b"pt2"
    except (zipfile.BadZipFile, OSError, KeyError):
        return False


def _check_expr(p: Path, text: str) -> None:
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ModelLoadError(f"model={p}: refused: a shape expression holds {text[pos : pos + 20]!r}, not sympy arithmetic")
        tok = m.group(0)
        if tok[0].isalpha() or tok[0] == "_":
            if tok not in _SYMPY_NAMES:
                raise ModelLoadError(f"model={p}: refused: a shape expression names {tok!r}, not a sympy constructor")
        elif tok[0] == "'" and not _SYMBOL_NAME.match(tok[1:-1]):
            raise ModelLoadError(f"model={p}: refused: a shape expression names the symbol {tok!r}")
        pos = m.end()


def _walk_exprs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "expr_str" and isinstance(v, str):
                yield v
            else:
                yield from _walk_exprs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk_exprs(v)


def check_archive(path: str | Path) -> None:
    """Refuse a .pt2 that torch.export.load would unpickle, evaluate or run code from (see the module docstring)."""
    p = Path(path)
    try:
        z = zipfile.ZipFile(p)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelLoadError(f"model={p}: not a readable .pt2 archive ({exc})") from None
    with z:
        names = z.namelist()
        roots = {n.split("/")[0] for n in names if n.split("/")[-1] == "archive_format"}
        if len(roots) != 1:
            raise ModelLoadError(f"model={p}: not a torch.export archive (no single archive_format entry)")
        root = roots.pop() + "/"
        models = [n for n in names if n.startswith(root + "models/") and n.endswith(".json")]
        if len(models) != 1:
            raise ModelLoadError(f"model={p}: holds {len(models)} programs; gdm-ray reads an archive of exactly one")
        model_name = models[0][len(root + "models/") : -len(".json")]
        if any(n.startswith(root + "data/aotinductor/") or n.startswith(root + "data/executorch/") for n in names):
            raise ModelLoadError(f"model={p}: refused: compiled AOTInductor/ExecuTorch payloads (gdm-ray reads plain programs)")
        if root + f"data/constants/{model_name}.pt" in names:
            raise ModelLoadError(f"model={p}: refused: legacy pickled constants (re-save it with torch.export.save)")
        try:
            program = json.loads(z.read(models[0]))
            configs = [
                json.loads(z.read(root + f"data/{kind}/{model_name}_{kind}_config.json")).get("config", {})
                for kind in ("weights", "constants")
            ]
        except (KeyError, ValueError, zipfile.BadZipFile) as exc:
            raise ModelLoadError(f"model={p}: corrupt torch.export archive ({str(exc)[:120]})") from None
    for kind, config in zip(("weight", "constant"), configs):
        for fqn, payload in config.items():
            if payload.get("use_pickle"):
                raise ModelLoadError(f"model={p}: refused: the {kind} {fqn!r} is stored as a pickle")
            name = str(payload.get("path_name", ""))
            if kind == "constant" and not name.startswith("tensor_"):
                raise ModelLoadError(f"model={p}: refused: the constant {fqn!r} is a Python or script object ({name})")
    if program.get("guards_code"):
        raise ModelLoadError(f"model={p}: refused: the program carries guard code (Python that would run on every call)")
    for text in _walk_exprs(program):
        _check_expr(p, text)
    for key in program.get("range_constraints", {}) or {}:
        if not _SYMBOL_NAME.match(str(key)):
            raise ModelLoadError(f"model={p}: refused: a range constraint names {str(key)[:40]!r}")


def check_graph(p: Path, gm: torch.fx.GraphModule) -> None:
    """Every call in the graph is an ATen/prims operator or symbolic integer arithmetic."""
    for node in gm.graph.nodes:
        if node.op == "call_function":
            t = node.target
            ok = (isinstance(t, torch._ops.OpOverload) and t.namespace in _NAMESPACES) or t in _SYM_CALLS
            if not ok:
                raise ModelLoadError(f"model={p}: refused: the program calls {getattr(t, '__name__', t)!r}, not an ATen operator")
        elif node.op == "call_module":
            raise ModelLoadError(f"model={p}: refused: the program calls a submodule ({node.target})")


@contextlib.contextmanager
def _weights_only_loads() -> Iterator[None]:
    """Every torch.load inside, whatever its caller asks, loads weights only."""
    saved = {k: os.environ.get(k) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _plain_mode(self: nn.Module, mode: bool = True) -> nn.Module:
    self.training = bool(mode)
    return self


class ProgramBatchNorm(nn.Module):
    """Stands for one BatchNorm node of a program: its ``training`` flag is that node's mode."""

    def __init__(self, node: str) -> None:
        super().__init__()
        self.node = node

    def extra_repr(self) -> str:
        return self.node


def _is_bn(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in (torch.ops.aten.batch_norm.default,)


def _is_dropout(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in (torch.ops.aten.dropout.default,)


class ProgramModule(nn.Module):
    """A loaded torch.export program as a trainable module (see the module docstring)."""

    def __init__(self, graph_module: torch.fx.GraphModule, fixed_batch: int | None = None) -> None:
        super().__init__()
        # torch's unlifted module refuses train()/eval(); its mode lives in the graph, set below
        graph_module.train = types.MethodType(_plain_mode, graph_module)  # type: ignore[method-assign]
        graph_module.eval = types.MethodType(lambda self: _plain_mode(self, False), graph_module)  # type: ignore[method-assign]
        self.program = graph_module
        self.fixed_batch = fixed_batch
        names = [n.name for n in graph_module.graph.nodes if _is_bn(n)]
        self.batchnorms = nn.ModuleList(ProgramBatchNorm(n) for n in names)
        self._state: tuple[bool, ...] | None = None
        self.train(False)

    def _wanted(self) -> tuple[bool, ...]:
        return (self.training, *(b.training for b in self.batchnorms))

    def _sync(self) -> None:
        """Write each BatchNorm's and the dropouts' mode into the graph (recompiling it) when changed."""
        want = self._wanted()
        if want == self._state:
            return
        flags = dict(zip((b.node for b in self.batchnorms), want[1:]))
        for node in self.program.graph.nodes:
            if _is_bn(node):  # aten.batch_norm(input, weight, bias, mean, var, training, momentum, eps, cudnn)
                args = list(node.args)
                args[5] = flags[node.name]
                node.args = tuple(args)
            elif _is_dropout(node):  # aten.dropout(input, p, train)
                args = list(node.args)
                args[2] = want[0]
                node.args = tuple(args)
        self.program.recompile()
        self._state = want

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._sync()
        b = self.fixed_batch
        if b is None or x.shape[0] == b:
            return self.program(x)
        outs = []
        for i in range(0, x.shape[0], b):  # a program exported for one batch size: run it in chunks, the last padded
            chunk = x[i : i + b]
            n = chunk.shape[0]
            if n < b:
                chunk = torch.cat([chunk, chunk[-1:].expand(b - n, *chunk.shape[1:])])
            outs.append(self.program(chunk)[:n])
        return torch.cat(outs)

    def __deepcopy__(self, memo: dict) -> ProgramModule:
        import copy
        import warnings

        with warnings.catch_warnings():  # torch's own pytree deprecation notice, raised inside its deepcopy
            warnings.simplefilter("ignore", FutureWarning)
            gm = copy.deepcopy(self.program, memo)
        new = ProgramModule(gm, self.fixed_batch)
        for mine, theirs in zip(new.batchnorms, self.batchnorms):
            mine.training = theirs.training
        new.training = self.training
        return new


def _input_example(gm: torch.fx.GraphModule) -> torch.Tensor | None:
    """The (fake) tensor the program's first input was traced with."""
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            return val if isinstance(val, torch.Tensor) else None
    return None


def _fixed_batch(gm: torch.fx.GraphModule) -> int | None:
    """The batch size a program was exported for, when it is not dynamic."""
    val = _input_example(gm)
    return int(val.shape[0]) if val is not None and val.dim() >= 1 and isinstance(val.shape[0], int) else None


def load_program(p: Path, device: str | torch.device) -> tuple[ProgramModule, dict]:
    """Check, load and wrap a .pt2 program; raises ModelLoadError naming the problem."""
    check_archive(p)
    extra = {META_NAME: ""}
    try:
        with _weights_only_loads():
            ep = torch.export.load(io.BytesIO(p.read_bytes()), extra_files=extra)  # a buffer: any file name
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad archives
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ModelLoadError(f"model={p}: corrupt or unreadable torch.export program ({text})") from None
    try:
        gm = ep.module(check_guards=False)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"model={p}: cannot build a module from the program ({str(exc)[:200]})") from None
    check_graph(p, gm)
    try:
        meta = json.loads(extra[META_NAME]) if extra[META_NAME] else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        meta = {}
    val = _input_example(gm)
    if not meta.get("input_shape") and val is not None and val.dim() == 4 and all(isinstance(s, int) for s in val.shape[1:]):
        meta["input_shape"] = [int(s) for s in val.shape[1:]]  # the program's own C x H x W, when static
    meta["format"] = "program"
    return ProgramModule(gm, _fixed_batch(gm)).to(device), meta


def save_program(model: nn.Module, path: Path | io.BytesIO, input_shape: tuple[int, int, int], meta: dict) -> None:
    """Export ``model`` in eval mode (a dynamic batch dimension unless it came with a fixed one) into ``path``."""
    was_training = model.training
    model.eval()
    try:
        device = next((t.device for t in model.parameters()), torch.device("cpu"))
        target, fixed = model, None
        if isinstance(model, ProgramModule):  # export the graph itself, in the batch size it came with
            model._sync()
            target, fixed = model.program, model.fixed_batch
        example = torch.zeros(fixed or 2, *input_shape, device=device)
        dynamic = None if fixed else ({0: torch.export.Dim.AUTO},)
        ep = torch.export.export(target, (example,), dynamic_shapes=dynamic)
        info = json.dumps({"input_shape": list(input_shape), **meta})
        torch.export.save(ep, path if isinstance(path, io.BytesIO) else str(path), extra_files={META_NAME: info})
    finally:
        model.train(was_training)
