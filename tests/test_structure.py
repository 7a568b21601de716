"""The package's shape, kept: no import circle anywhere (imports inside
functions count), the core and the store take no DictConfig, and no command
function grows past a screen. Measured by bench/structure.py's own code."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _structure():
    spec = importlib.util.spec_from_file_location("bench_structure", ROOT / "bench" / "structure.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_no_import_circles():
    assert _structure().figures(ROOT)["circles"] == []


def test_circles_are_found():
    """The detector itself: a two-module circle is reported."""
    s = _structure()
    assert s.circles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_only_the_cli_sees_dictconfig():
    f = _structure().figures(ROOT)
    assert f["dictconfig"] == []
    assert f["dictconfig_cli"] <= 2  # the dispatcher's composing and typing step


def test_layers_import_one_way():
    """cli -> distributed -> store -> core: no layer imports one above it."""
    s = _structure()
    mods = s.modules(ROOT)
    rank = {"gdm_ray.core": 0, "gdm_ray.store": 1, "gdm_ray.distributed": 2, "gdm_ray.cli": 3}

    def layer(m: str) -> int | None:
        return next((r for p, r in rank.items() if m == p or m.startswith(p + ".")), None)

    upward = [
        (m, t)
        for m, p in mods.items()
        for t in s.imports(m, p, set(mods))
        if layer(m) is not None and layer(t) is not None and layer(t) > layer(m)
    ]
    assert upward == []
