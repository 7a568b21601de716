"""`gdm-ray trojai`: the TrojAI program's detector interface around gdm-ray's scan.

TrojAI calls a detector with fixed flags (not Hydra overrides)::

    gdm-ray trojai infer --model_filepath M --result_filepath R --scratch_dirpath S \\
        --examples_dirpath E --round_training_dataset_dirpath T \\
        --metaparameters_filepath P --schema_filepath J --learned_parameters_dirpath L
    gdm-ray trojai configure --configure_models_dirpath D --learned_parameters_dirpath L \\
        --scratch_dirpath S --metaparameters_filepath P --schema_filepath J [--automatic_configuration]
    gdm-ray trojai mitigate --model_filepath M --examples_dirpath E --output_dirpath O [--target_class K|auto]

infer scans the model on its clean examples (``class_K_example_N.png``, or an
image with a ``.json`` beside it naming its label) and writes one probability
that it is backdoored: a logistic function of the scan's anomaly score,
``sigmoid(a * score + b)``. configure fits ``a`` and ``b`` on a reference zoo
in TrojAI's layout (``id-*/model.pt``, ``id-*/clean-example-data/``,
``id-*/ground_truth.csv`` holding 1 for poisoned) by minimising the
cross-entropy, keeps them in ``learned_parameters/calibration.json`` and
reports the fit as TrojAI scores it (cross-entropy and ROC AUC). Without a
calibration the default maps the scan's own threshold (2.0) to 0.5.
mitigate wraps ``defend``. Metaparameters (configs/trojai/metaparameters.json,
checked against metaparameters_schema.json) are scan settings as dotted keys.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from gdm_ray.core.errors import DataError

__all__ = ["main", "load_examples", "fit_calibration"]

DEFAULT_CALIBRATION = {"a": 2.0, "b": -4.0, "fitted_on": None}  # sigmoid(2 * (score - 2)): 0.5 at the scan's threshold


class TrojaiError(Exception):
    """One line for the user; the exit code is 1."""


def load_examples(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N x H x W x C uint8) and labels from a TrojAI example folder (``gdm_ray.core.examples``)."""
    from gdm_ray.core.examples import load_examples as read  # torch: only when a command runs, not for --help

    try:
        return read(folder)
    except DataError as exc:  # the core names the folder; TrojAI's users know it by its flag
        raise TrojaiError(f"--examples_dirpath {exc}") from None


def _metaparameters(path: Path | None, schema: Path | None) -> list[str]:
    """The metaparameters file as Hydra overrides, every key checked against the schema."""
    if path is None:
        return []
    try:
        values = json.loads(path.read_text())
        spec = json.loads(schema.read_text()) if schema is not None else None
    except (OSError, json.JSONDecodeError) as exc:
        raise TrojaiError(f"metaparameters: cannot read {path if not isinstance(exc, OSError) else exc.filename}: {exc}") from None
    if not isinstance(values, dict):
        raise TrojaiError(f"--metaparameters_filepath {path}: must hold a JSON object")
    types = {"integer": int, "number": (int, float), "boolean": bool, "string": str}
    props = (spec or {}).get("properties", {})
    out = []
    for key, value in values.items():
        if spec is not None:
            if key not in props:
                raise TrojaiError(f"--metaparameters_filepath {path}: {key!r} is not in the schema ({', '.join(sorted(props))})")
            want = types.get(props[key].get("type", ""), object)
            if not isinstance(value, want) or (want is int and isinstance(value, bool)):
                raise TrojaiError(f"--metaparameters_filepath {path}: {key}={value!r} is not of type {props[key].get('type')}")
            lo, hi = props[key].get("minimum"), props[key].get("maximum")
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                raise TrojaiError(f"--metaparameters_filepath {path}: {key}={value!r} is outside [{lo}, {hi}]")
        out.append(f"{key}={json.dumps(value) if isinstance(value, bool) else value}")
    return out


def _score(model: Path, examples: Path, scratch: Path, overrides: list[str]) -> float:
    """The scan's anomaly score of ``model`` on its clean examples."""
    from gdm_ray.cli.compose import compose_settings
    from gdm_ray.cli.scan import scan

    if not model.is_file():
        raise TrojaiError(f"--model_filepath {model}: no such file")
    x, y = load_examples(examples)
    scratch.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=scratch, prefix="gdm-ray-"))
    np.savez(work / "examples.npz", x=x, y=y)
    # all the examples are the defender's clean set (the split's other parts are a token image each)
    n = len(y)
    data = ["data=npz", f"data.path={work / 'examples.npz'}", f"data.fractions=[0,{1 - 1 / n:.9f},{1 / n - 1e-9:.9f}]"]
    s = compose_settings("scan", [f"model={model}", *data, "progress=false", f"out={work / 'scan'}", *overrides])
    return float(scan(s)["score"])


def _calibration(learned: Path | None) -> dict[str, Any]:
    f = learned / "calibration.json" if learned is not None else None
    if f is None or not f.is_file():
        return dict(DEFAULT_CALIBRATION)
    return json.loads(f.read_text())


def probability(score: float, cal: dict[str, Any]) -> float:
    z = float(cal["a"]) * score + float(cal["b"])
    return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0


def fit_calibration(scores: list[float], labels: list[int], steps: int = 2000) -> dict[str, float]:
    """Logistic a, b minimising the mean cross-entropy (Newton's method, a small ridge for separable data)."""
    s, t = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    w = np.zeros(2)
    X = np.stack([s, np.ones_like(s)], 1)
    ridge = 1e-2
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(X @ w)))
        g = X.T @ (p - t) / len(t) + ridge * np.array([w[0], 0.0])
        h = (X.T * (p * (1 - p))) @ X / len(t) + ridge * np.diag([1.0, 1e-6])
        step = np.linalg.solve(h, g)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return {"a": float(w[0]), "b": float(w[1])}


def cross_entropy(probs: list[float], labels: list[int]) -> float:
    eps = 1e-12
    return float(np.mean([-(t * math.log(max(p, eps)) + (1 - t) * math.log(max(1 - p, eps))) for p, t in zip(probs, labels)]))


def roc_auc(scores: list[float], labels: list[int]) -> float:
    pos = [s for s, t in zip(scores, labels) if t]
    neg = [s for s, t in zip(scores, labels) if not t]
    if not pos or not neg:
        return float("nan")
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (len(pos) * len(neg))


def _label(folder: Path) -> int:
    gt = folder / "ground_truth.csv"
    if not gt.is_file():
        raise TrojaiError(f"--configure_models_dirpath: {folder.name} has no ground_truth.csv")
    text = gt.read_text().strip()
    if text not in ("0", "1"):
        raise TrojaiError(f"--configure_models_dirpath: {gt} holds {text[:20]!r}, not 0 or 1")
    return int(text)


def _infer(a: argparse.Namespace) -> int:
    overrides = _metaparameters(a.metaparameters_filepath, a.schema_filepath)
    score = _score(a.model_filepath, a.examples_dirpath, a.scratch_dirpath, overrides)
    p = probability(score, _calibration(a.learned_parameters_dirpath))
    a.result_filepath.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.result_filepath.with_name(a.result_filepath.name + ".partial")
    tmp.write_text(f"{p}\n")
    tmp.replace(a.result_filepath)
    print(f"gdm-ray trojai: {a.model_filepath}: score {score:.3f}, probability {p:.4f} -> {a.result_filepath}")
    return 0


def _configure(a: argparse.Namespace) -> int:
    root = a.configure_models_dirpath
    if root is None or not root.is_dir():
        raise TrojaiError(f"--configure_models_dirpath {root}: no such folder")
    folders = sorted(d for d in root.iterdir() if d.is_dir() and any(d.glob("model.*")))
    if len(folders) < 2:
        raise TrojaiError(f"--configure_models_dirpath {root}: needs at least 2 model folders (id-*/model.pt), found {len(folders)}")
    overrides = _metaparameters(a.metaparameters_filepath, a.schema_filepath)
    scores, labels = [], []
    for d in folders:
        model = next(iter(sorted(d.glob("model.*"))))
        labels.append(_label(d))
        scores.append(_score(model, d / "clean-example-data", a.scratch_dirpath, overrides))
        print(f"  {d.name}: score {scores[-1]:.3f}, poisoned {labels[-1]}", flush=True)
    if len(set(labels)) < 2:
        raise TrojaiError(f"--configure_models_dirpath {root}: the calibration needs both clean and poisoned models")
    cal = {**fit_calibration(scores, labels), "fitted_on": str(root), "models": len(folders)}
    probs = [probability(s, cal) for s in scores]
    cal.update(cross_entropy=cross_entropy(probs, labels), roc_auc=roc_auc(scores, labels),
               default_cross_entropy=cross_entropy([probability(s, DEFAULT_CALIBRATION) for s in scores], labels))  # fmt: skip
    a.learned_parameters_dirpath.mkdir(parents=True, exist_ok=True)
    (a.learned_parameters_dirpath / "calibration.json").write_text(json.dumps(cal, indent=2) + "\n")
    print(f"gdm-ray trojai configure: {len(folders)} models, cross-entropy {cal['cross_entropy']:.4f} "
          f"(uncalibrated {cal['default_cross_entropy']:.4f}), ROC AUC {cal['roc_auc']:.3f}")  # fmt: skip
    return 0


def _mitigate(a: argparse.Namespace) -> int:
    from gdm_ray.cli.compose import compose_settings
    from gdm_ray.cli.search import defend

    if not a.model_filepath.is_file():
        raise TrojaiError(f"--model_filepath {a.model_filepath}: no such file")
    x, y = load_examples(a.examples_dirpath)
    a.output_dirpath.mkdir(parents=True, exist_ok=True)
    npz = a.output_dirpath / "examples.npz"
    np.savez(npz, x=x, y=y)
    data = ["data=npz", f"data.path={npz}", "data.fractions=[0,0.8,0.2]"]
    s = compose_settings("defend", [f"model={a.model_filepath}", f"target_class={a.target_class}", *data, "progress=false",
                                    f"out={a.output_dirpath / 'defend'}"])  # fmt: skip
    m = defend(s)
    print(f"gdm-ray trojai mitigate: repaired model in {a.output_dirpath / 'defend'} ({m.get('repaired_model')})")
    return 0


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (the usage block stays for --help)."""

    def error(self, message: str):  # type: ignore[override]
        raise _UsageError(f"{self.prog}: {message}")


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="gdm-ray trojai", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    common = {"--scratch_dirpath": Path, "--metaparameters_filepath": Path, "--schema_filepath": Path, "--learned_parameters_dirpath": Path}
    inf = sub.add_parser("infer", help="one probability that the model is backdoored")
    for flag in ("--model_filepath", "--result_filepath", "--examples_dirpath"):
        inf.add_argument(flag, type=Path, required=True)
    inf.add_argument("--round_training_dataset_dirpath", type=Path)
    cfg = sub.add_parser("configure", help="fit the score-to-probability calibration on a reference zoo")
    cfg.add_argument("--configure_models_dirpath", type=Path, required=True)
    cfg.add_argument("--automatic_configuration", action="store_true")
    for p in (inf, cfg):
        for flag, kind in common.items():
            p.add_argument(flag, type=kind, required=flag in ("--scratch_dirpath", "--learned_parameters_dirpath") and p is cfg)
        p.set_defaults(scratch_dirpath=Path(tempfile.gettempdir()))
    mit = sub.add_parser("mitigate", help="repair the model (gdm-ray defend) on its clean examples")
    for flag in ("--model_filepath", "--examples_dirpath", "--output_dirpath"):
        mit.add_argument(flag, type=Path, required=True)
    mit.add_argument("--target_class", default="auto")
    return ap


def main(argv: list[str]) -> int:
    from gdm_ray.core.errors import GdmRayError

    try:
        a = _parser().parse_args(argv)
    except _UsageError as exc:
        print(f"gdm-ray trojai: error: {exc} (see gdm-ray trojai --help)", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    try:
        return {"infer": _infer, "configure": _configure, "mitigate": _mitigate}[a.mode](a)
    except (TrojaiError, GdmRayError) as exc:
        text = str(exc).strip().splitlines()
        print(f"gdm-ray trojai: error: {text[0] if text else type(exc).__name__}", file=sys.stderr)
        return 1
