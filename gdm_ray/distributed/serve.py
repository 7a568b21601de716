"""The trigger-sampling endpoint: a Ray Serve app with a FastAPI ingress.

    POST /v1/sample     {ensemble, n, seed?, level?, format?, encoding?} -> triggers (JSON) or a PNG grid
    GET  /v1/ensembles  what is served: id, uri, target class, trigger shape, levels, weights, ...
    GET  /healthz       liveness (never needs the token)
    GET  /docs, /openapi.json   FastAPI's OpenAPI docs (never need the token: they hold no data)

``build_app(args)`` is the application builder, so a Serve config (KubeRay's
serveConfigV2, ``serve run``) names ``gdm_ray.distributed.serve:build_app`` with
plain YAML args; ``gdm-ray serve`` builds the same args from configs/serve.yaml.

Ensemble ids: an entry of ``ensembles`` is ``URI`` or ``ID=URI``. Without an
id it is the URI's last path component, skipping a final ``ensemble`` folder
(what search/defend/scan write): ``runs/fm-fixed/ensemble`` -> ``fm-fixed``,
``s3://b/zoo/m1/class-3/ensemble`` -> ``class-3``. Ids match
``[A-Za-z0-9][A-Za-z0-9._-]*`` (at most 64 characters); two entries with the
same id (given or derived) are a ConfigError naming both URIs, never a
silent pick: name them ``ID=URI``.

Reproducibility: a request with ``seed`` returns exactly what
``Ensemble.sample(n, torch.Generator().manual_seed(seed), level)`` returns in
process, bit for bit, whatever else is in its batch; a request without one
gets a fresh seed (drawn from the OS) and the response says which, so any
answer can be asked for again.

Batching: concurrent requests are gathered with ``@serve.batch`` (requests
that arrive while a batch runs form the next one; ``batch_wait_timeout_s``
0 by default, since waiting only added latency at low load) and sampled in
one call, each from its own generator and with its own forward pass. One
forward over the concatenated noise was measured (bench/serve.py) to save
about 0.1-0.2 ms per 64-trigger request against several ms of HTTP path per
request, and it is not bit-exact: the CPU matmul rounds differently for
other row counts (seen for requests of 1-16 triggers), so a seeded request
would not always repeat exactly. The per-request pass keeps the contract above.
"""

import base64
import hmac
import io
import json
import math
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
import torch
from fastapi import FastAPI, Header, HTTPException, Security
from fastapi.responses import Response
from fastapi.security import HTTPBearer
from pydantic import BaseModel, Field
from ray import serve

from gdm_ray.core.ensemble import Ensemble
from gdm_ray.core.errors import ConfigError

__all__ = ["ServeSettings", "Sampler", "Job", "parse_ensembles", "ensemble_id", "build_app", "png_grid", "TriggerService"]

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SEED_MAX = 2**63 - 1
OPEN_PATHS = ("/healthz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")


# --- settings (plain, YAML-able args) ---------------------------------------------------------


def ensemble_id(uri: str) -> str:
    """The default id of an ensemble URI: its last path component, skipping a final ``ensemble``."""
    parts = [p for p in re.split(r"[/\\]+", uri.removeprefix("s3://")) if p not in ("", ".")]
    while len(parts) > 1 and parts[-1] == "ensemble":
        parts.pop()
    return parts[-1] if parts else uri


def parse_ensembles(entries: Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """``[URI or ID=URI, ...]`` (or ``{ID: URI}``) -> {id: uri}; bad or colliding ids are a ConfigError."""
    if isinstance(entries, Mapping):
        pairs = [(str(k), str(v)) for k, v in entries.items()]
    elif isinstance(entries, (str, bytes)) or not isinstance(entries, Sequence):
        raise ConfigError(f"ensembles={entries!r} must be a list of URI or ID=URI entries")
    else:
        pairs = []
        for entry in entries:
            if not isinstance(entry, str) or not entry.strip():
                raise ConfigError(f"ensembles: entry {entry!r} is not a URI or ID=URI")
            # "ID=URI" only when the part before "=" is a plain id (a path may hold "=" too)
            head, sep, tail = entry.partition("=")
            pairs.append((head, tail) if sep and _ID.match(head) and tail else (ensemble_id(entry), entry))
    if not pairs:
        raise ConfigError("ensembles=[] names no ensemble: give ensembles=[URI,...] (a directory or s3://bucket/prefix)")
    out: dict[str, str] = {}
    for eid, uri in pairs:
        if not _ID.match(eid):
            raise ConfigError(f"ensembles: id {eid!r} (of {uri}) must match [A-Za-z0-9][A-Za-z0-9._-]* (<= 64 chars); name it ID=URI")
        if eid in out:
            raise ConfigError(f"ensembles: {out[eid]} and {uri} both have the id {eid!r}; name them ID=URI")
        out[eid] = uri
    return out


def _number(args: Mapping, key: str, default: Any, kind: type, low: float, high: float = math.inf) -> Any:
    v = args.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
        raise ConfigError(f"{key}={v!r} is not {'an integer' if kind is int else 'a number'}")
    if not low <= v <= high:
        raise ConfigError(f"{key}={v} must be in [{low}, {high}]")
    return kind(v)


def _flag(args: Mapping, key: str, default: bool) -> bool:
    v = args.get(key, default)
    if not isinstance(v, bool):
        raise ConfigError(f"{key}={v!r} must be true or false")
    return v


@dataclass(frozen=True)
class ServeSettings:
    """What the app needs; ``from_args`` reads and checks the builder's args (configs/serve.yaml keys)."""

    ensembles: dict[str, str]
    token: str | None = None
    max_n: int = 4096
    max_png_n: int = 1024
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.0
    autoscaling: dict[str, Any] | None = None  # None: one replica
    max_ongoing_requests: int = 64
    replica_cpus: float = 1.0
    access_log: bool = False  # a log line per request costs the replica time on a busy node
    store: dict[str, Any] | None = field(default=None, repr=False)

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> "ServeSettings":
        args = dict(args or {})
        known = {
            "ensembles",
            "token",
            "token_env",
            "max_n",
            "max_png_n",
            "batching",
            "autoscaling",
            "max_ongoing_requests",
            "replica_cpus",
            "access_log",
            "store",
        }
        unknown = sorted(set(args) - known)
        if unknown:
            raise ConfigError(f"serve args: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        token = args.get("token")
        if token is None and args.get("token_env", "GDM_RAY_TOKEN"):
            # a Secret in the replica's environment, so a Serve config file need not hold the token
            token = os.environ.get(str(args.get("token_env", "GDM_RAY_TOKEN"))) or None
        if token is not None and (not isinstance(token, str) or not token.strip()):
            raise ConfigError("token must be a non-empty string (or null: no authentication)")
        batching = dict(args.get("batching") or {})
        auto = args.get("autoscaling")
        if auto is not None:
            auto = dict(auto)
            lo = _number(auto, "min_replicas", 1, int, 0)
            hi = _number(auto, "max_replicas", max(lo, 1), int, max(lo, 1))
            target = _number(auto, "target_ongoing_requests", 8, float, 1e-3)
            auto = {**auto, "min_replicas": lo, "max_replicas": hi, "target_ongoing_requests": target}
        store = args.get("store")
        return cls(
            ensembles=parse_ensembles(args.get("ensembles") or []),
            token=token,
            max_n=_number(args, "max_n", 4096, int, 1),
            max_png_n=_number(args, "max_png_n", 1024, int, 1),
            max_batch_size=_number(batching, "max_batch_size", 16, int, 1),
            batch_wait_timeout_s=_number(batching, "batch_wait_timeout_s", 0.0, float, 0.0, 10.0),
            autoscaling=auto,
            max_ongoing_requests=_number(args, "max_ongoing_requests", 64, int, 1),
            replica_cpus=_number(args, "replica_cpus", 1.0, float, 1e-3),
            access_log=_flag(args, "access_log", False),
            store=dict(store) if store else None,
        )

    def deployment_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": self.replica_cpus},
            "logging_config": {"enable_access_log": self.access_log},
        }
        if self.autoscaling is None:
            opts["num_replicas"] = 1
        else:
            opts["autoscaling_config"] = self.autoscaling
        return opts


# --- the work of a request, without Ray (also the bench's in-process path) -----------------------


@dataclass(frozen=True)
class Job:
    """One checked request: which ensemble, how many, from which seed, which level."""

    ensemble: str
    n: int
    seed: int
    level: int | None


class Sampler:
    """The ensembles one replica serves, loaded through gdm_ray.store (local directory or S3)."""

    def __init__(self, settings: ServeSettings, ensembles: Mapping[str, Ensemble] | None = None) -> None:
        from gdm_ray.store.artifacts import open_ensemble

        self.settings = settings
        self.ensembles = (
            dict(ensembles)
            if ensembles is not None
            else {eid: open_ensemble(uri, settings.store) for eid, uri in settings.ensembles.items()}
        )

    def describe(self) -> list[dict[str, Any]]:
        out = []
        for eid, ens in self.ensembles.items():
            m = ens.manifest
            out.append(
                dict(
                    id=eid,
                    uri=self.settings.ensembles.get(eid, ""),
                    target_class=ens.target_class,
                    trigger_shape=[int(v) for v in m["trigger_shape"]],
                    levels=int(m["levels"]),
                    with_alpha=bool(m["with_mask"]),
                    weights=[float(w) for w in m["weights"]],
                    betas=[float(b) for b in m["betas"]],
                    position=list(ens.position) if ens.position is not None else None,
                    source_model_sha256=m.get("source_model_sha256"),
                )
            )
        return out

    def job(self, ensemble: str, n: int, seed: int | None, level: int | None, png: bool = False) -> Job:
        """Check a request against the bounds and the ensemble; HTTPException (4xx) naming the bad value."""
        if ensemble not in self.ensembles:
            raise HTTPException(404, f"ensemble {ensemble!r} is not served (served: {', '.join(self.ensembles)})")
        bound = min(self.settings.max_n, self.settings.max_png_n) if png else self.settings.max_n
        if not 1 <= n <= bound:
            what = "max_png_n" if png and bound < self.settings.max_n else "max_n"
            raise HTTPException(422, f"n={n} must be in 1..{bound} ({what}={bound})")
        levels = self.ensembles[ensemble].mesa.generators.levels
        if level is not None and not 0 <= level < levels:
            raise HTTPException(422, f"level={level} must be in 0..{levels - 1} (ensemble {ensemble!r} has {levels} levels) or null")
        return Job(ensemble, n, secrets.randbits(63) if seed is None else seed, level)

    def sample(self, job: Job) -> tuple[torch.Tensor, torch.Tensor]:
        """Exactly ``Ensemble.sample`` with the job's seed (the reproducibility contract)."""
        return self.ensembles[job.ensemble].sample(job.n, torch.Generator().manual_seed(job.seed), job.level)

    def sample_many(self, jobs: Sequence[Job]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self.sample(j) for j in jobs]


def encode_json(job: Job, patterns: torch.Tensor, alphas: torch.Tensor, encoding: str = "lists") -> bytes:
    """The JSON body: nested lists, or base64 of little-endian float32 in C order (``encoding``).
    orjson writes the float32 arrays directly, each value as the shortest decimal that reads back
    as the same float32: exact, and about 15x faster than tolist() + json.dumps for 64 triggers."""
    if encoding == "base64":

        def enc(t: torch.Tensor) -> Any:
            return base64.b64encode(t.detach().cpu().contiguous().numpy().astype("<f4", copy=False).tobytes()).decode()
    else:

        def enc(t: torch.Tensor) -> Any:
            return t.detach().cpu().to(torch.float32).contiguous().numpy()

    body = {
        "ensemble": job.ensemble,
        "n": job.n,
        "seed": job.seed,
        "level": job.level,
        "shape": list(patterns.shape[1:]),
        "encoding": encoding,
        "patterns": enc(patterns),
        "alphas": enc(alphas),
    }
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def png_grid(patterns: torch.Tensor, alphas: torch.Tensor, cell: int = 32) -> bytes:
    """The triggers as a PNG grid, each blended by its alpha over mid-grey (as plots.save_level_grid
    shows them) in a blue frame; 1-channel triggers in grey, 3-channel in colour, others by their first channel."""
    from PIL import Image

    n, c, h, w = patterns.shape
    img = (1 - alphas.unsqueeze(1)) * 0.5 + alphas.unsqueeze(1) * patterns  # n x C x h x w
    img = img if c == 3 else img[:, :1].expand(-1, 3, -1, -1)
    k = max(1, cell // max(h, w))  # nearest-neighbour upscaling: small triggers stay visible
    img = img.repeat_interleave(k, dim=2).repeat_interleave(k, dim=3)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    ch, cw, gap = h * k, w * k, 4
    # a blue frame: black, white and grey triggers all stand apart from it
    grid = torch.tensor([0.2, 0.35, 0.8]).view(3, 1, 1).repeat(1, rows * (ch + gap) + gap, cols * (cw + gap) + gap)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[:, gap + r * (ch + gap) : gap + r * (ch + gap) + ch, gap + q * (cw + gap) : gap + q * (cw + gap) + cw] = img[i]
    arr = (grid.clamp(0, 1) * 255).round().to(torch.uint8)
    pil = Image.fromarray(arr.permute(1, 2, 0).contiguous().numpy())
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


# --- HTTP ------------------------------------------------------------------------------------------


class SampleRequest(BaseModel):
    ensemble: str = Field(description="an id from GET /v1/ensembles")
    n: int = Field(64, description="how many triggers (1..max_n; the bound is in the error message)")
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="same seed, same triggers; null: a fresh seed (returned)")
    level: int | None = Field(None, description="one staircase level, or null: a level per trigger by the ensemble weights")
    format: Literal["json", "png"] = Field("json", description="json triggers, or a PNG grid of them (also: Accept: image/png)")
    encoding: Literal["lists", "base64"] = Field("lists", description="json only: nested lists, or base64 float32 little-endian, C order")


class SampleResponse(BaseModel):
    ensemble: str
    n: int
    seed: int = Field(description="the seed used (the request's, or a fresh one): send it back for the same triggers")
    level: int | None
    shape: list[int] = Field(description="[C, h, w] of each pattern; alphas are [h, w]")
    encoding: Literal["lists", "base64"]
    patterns: list | str = Field(description="n x C x h x w in [0, 1]")
    alphas: list | str = Field(description="n x h x w in [0, 1]: after = (1 - alpha) * image + alpha * pattern")


class EnsembleInfo(BaseModel):
    id: str
    uri: str
    target_class: int
    trigger_shape: list[int]
    levels: int
    with_alpha: bool  # the HTTP field keeps its name: clients read it (the manifest says with_mask)
    weights: list[float]
    betas: list[float]
    position: list[int] | None = Field(description="fixed top-left [row, col] of the triggers, or null: anywhere")
    source_model_sha256: str | None


class EnsembleList(BaseModel):
    ensembles: list[EnsembleInfo]


class Health(BaseModel):
    status: Literal["ok"]
    ensembles: int


class _BearerAuth:
    """Checks ``Authorization: Bearer <token>`` before routing (so before the body is parsed: an
    unauthenticated client learns nothing from validation errors). The replica puts the token in
    ``app.state.token``; OPEN_PATHS stay open."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        token = getattr(scope["app"].state, "token", None) if scope["type"] == "http" and "app" in scope else None
        if token:
            path = scope.get("path", "")
            root = scope.get("root_path", "")
            rel = path[len(root) :] if root and path.startswith(root) else path
            if rel not in OPEN_PATHS:
                given = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
                scheme, _, cred = given.partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(cred.strip().encode(), token.encode()):
                    why = "missing" if not given else "wrong"
                    body = json.dumps({"detail": f"{why} bearer token: send 'Authorization: Bearer <token>'"}).encode()
                    await send(
                        {
                            "type": "http.response.start",
                            "status": 401,
                            "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")],
                        }
                    )
                    await send({"type": "http.response.body", "body": body})
                    return
        await self.app(scope, receive, send)


api = FastAPI(
    title="gdm-ray trigger sampler",
    description="Samples triggers from MESA ensembles (staircase generators of a backdoor's valid triggers). "
    "With a token configured, /v1/* needs 'Authorization: Bearer <token>'; /healthz and the docs stay open.",
    version="1",
)
api.add_middleware(_BearerAuth)
_bearer = HTTPBearer(auto_error=False, description="the server's token (serve config `token`), when one is set")
_ERRORS = {
    401: {"description": "missing or wrong bearer token"},
    404: {"description": "unknown ensemble"},
    422: {"description": "bad request: n out of bounds, level out of range, malformed JSON"},
}


@serve.deployment(name="Sampler")
@serve.ingress(api)
class TriggerService:
    """One replica: every configured ensemble in memory, torch on ``replica_cpus`` threads."""

    def __init__(self, args: dict[str, Any]) -> None:
        from gdm_ray.distributed.runtime import pin_threads

        self.settings = ServeSettings.from_args(args)
        pin_threads(self.settings.replica_cpus)
        self.sampler = Sampler(self.settings)
        api.state.token = self.settings.token
        self._batch.set_max_batch_size(self.settings.max_batch_size)
        self._batch.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)

    @api.get("/healthz", response_model=Health)
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "ensembles": len(self.sampler.ensembles)}

    @api.get("/v1/ensembles", response_model=EnsembleList, responses={401: _ERRORS[401]}, dependencies=[Security(_bearer)])
    async def list_ensembles(self) -> dict[str, Any]:
        return {"ensembles": self.sampler.describe()}

    @api.post(
        "/v1/sample",
        response_model=SampleResponse,
        dependencies=[Security(_bearer)],
        responses={200: {"content": {"image/png": {}}, "description": "triggers as JSON, or a PNG grid"}, **_ERRORS},
    )
    async def sample(self, req: SampleRequest, accept: str | None = Header(None, include_in_schema=False)) -> Response:
        png = req.format == "png" or ("image/png" in (accept or "") and "application/json" not in (accept or ""))
        job = self.sampler.job(req.ensemble, req.n, req.seed, req.level, png=png)
        patterns, alphas, batch = await self._batch(job)
        headers = {"X-Seed": str(job.seed), "X-Batch-Size": str(batch)}  # how many requests shared its batch
        if png:
            return Response(png_grid(patterns, alphas), media_type="image/png", headers=headers)
        return Response(encode_json(job, patterns, alphas, req.encoding), media_type="application/json", headers=headers)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def _batch(self, jobs: list[Job]) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        return [(p, a, len(jobs)) for p, a in self.sampler.sample_many(jobs)]


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application builder (``gdm_ray.distributed.serve:build_app``): args as in configs/serve.yaml
    (ensembles, token, token_env, max_n, max_png_n, batching, autoscaling, max_ongoing_requests,
    replica_cpus, access_log, store). Checked here, so a bad config fails at deploy time, not in a replica."""
    settings = ServeSettings.from_args(args)
    plain = {k: v for k, v in dict(args).items()}
    plain["ensembles"] = dict(settings.ensembles)  # ids resolved once, the same in every replica
    return TriggerService.options(**settings.deployment_options()).bind(plain)
