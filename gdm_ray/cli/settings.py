"""Typed settings of every command, registered as Hydra structured configs.

Each command's primary config (``configs/<command>.yaml``) starts from its
schema here (``<command>_schema``), so every default lives once, in a
dataclass: the run keys in ``RunSettings``, each group's in the core's own
config class (``MESAConfig``, ``ScanConfig``, ...), registered as the group's
``default`` option. Hydra checks types and unknown keys as it composes;
``settings()`` turns the composed config into these dataclasses, whose
``__post_init__`` checks values, so a command starts with settings already
validated and never sees a DictConfig.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from gdm_ray.core.baseline import BaselineConfig
from gdm_ray.core.data import DataSpec
from gdm_ray.core.defense import DefenseConfig
from gdm_ray.core.errors import ConfigError
from gdm_ray.core.first_pass import ScanConfig
from gdm_ray.core.mesa import MESAConfig
from gdm_ray.core.repair import METHODS, SEARCH_METHODS
from gdm_ray.core.train import TrainConfig
from gdm_ray.core.triggers import TriggerSpec
from gdm_ray.distributed.runtime import RayConfig
from gdm_ray.distributed.sweep import SweepConfig
from gdm_ray.store.s3 import S3Config

__all__ = [
    "RunSettings",
    "ArchSpec",
    "ModelReading",
    "ModelOptions",
    "AttackOptions",
    "AttackSettings",
    "EvaluateSettings",
    "SearchSettings",
    "DefendSettings",
    "ScanSettings",
    "ZooOptions",
    "ZooScanSettings",
    "SweepSettings",
    "ServeSettings",
    "DemoSettings",
    "SCHEMAS",
    "register",
    "settings",
    "build",
]

T = TypeVar("T")


def _check_device(device: str) -> None:
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise ConfigError(f"device={device!r} must be auto, cpu or cuda[:k]")


@dataclass
class RunSettings:
    """The run keys every command shares."""

    seed: int = 0  # seeds every random draw of the run
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = None  # torch CPU threads (None: torch's default)
    keep_freed_memory: bool = True  # malloc keeps freed tensor memory: no page faults per step (core/allocator.py)
    progress: bool = True  # progress bars on stderr
    out: str | None = None  # output folder or s3:// prefix (None: ./gdm-ray-runs/<command>-<time>)

    def __post_init__(self) -> None:
        _check_device(self.device)
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads={self.threads} must be >= 1 (or null)")


@dataclass
class ArchSpec:
    """A known architecture for state-dict weights or a new model: gdm-ray's own
    (gdm_ray.core.models: small_cnn, resnet9) or a standard one
    (gdm_ray.core.standard_models: preact_resnet18, vgg16_bn, mobilenet_v2, vit)."""

    name: str = "small_cnn"
    width: int | None = None  # gdm-ray's own architectures
    mean: list[float] | None = None  # the input normalisation the weights were trained with (put inside the model)
    std: list[float] | None = None


@dataclass
class ModelReading:
    """How model files are read."""

    allow_pickle: bool = False  # you trust the file: a pickled checkpoint may be unpickled (once, converted to .pt2)
    key_map: list[str] = field(default_factory=list)  # "old=new" state-dict key-prefix renames, in order


@dataclass
class ModelOptions(ModelReading):
    """The model file and how it is read; ``model=PATH`` is short for ``model.path=PATH``."""

    path: str = MISSING  # a .pt2 program, TorchScript, safetensors or weights-only checkpoint (local or s3://)


def _target(value: Any, allow_auto: bool = False) -> Any:
    if allow_auto and value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"target_class={value!r} must be a class index" + (" or auto" if allow_auto else ""))
    return value


@dataclass
class AttackOptions:
    target_class: int = 0  # the backdoor's target class c
    rate: float = 0.1  # poisoning rate r (0 trains a clean model the same way)
    init: str | None = None  # a model file to fine-tune instead of training from scratch

    def __post_init__(self) -> None:
        _target(self.target_class)
        if not 0.0 <= float(self.rate) <= 1.0:
            raise ConfigError(f"attack.rate={self.rate} must be in [0, 1]")


@dataclass
class AttackSettings(RunSettings):
    data: DataSpec = field(default_factory=DataSpec)
    arch: ArchSpec = field(default_factory=ArchSpec)
    train: TrainConfig = field(default_factory=TrainConfig)
    trigger: TriggerSpec = field(default_factory=TriggerSpec)
    store: S3Config = field(default_factory=S3Config)
    attack: AttackOptions = field(default_factory=AttackOptions)


@dataclass
class EvaluateSettings(RunSettings):
    model: ModelOptions = field(default_factory=ModelOptions)
    target_class: int | None = None  # None: from the model card
    split: str = "eval"  # eval | defense | train
    data: DataSpec = field(default_factory=DataSpec)
    trigger: TriggerSpec | None = None  # None: from the model card
    arch: ArchSpec | None = None  # only for a safetensors file whose header names no arch
    store: S3Config = field(default_factory=S3Config)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_class is not None:
            _target(self.target_class)
        if self.split not in ("eval", "defense", "train"):
            raise ConfigError(f"split={self.split!r} must be eval, defense or train")


@dataclass
class SearchSettings(RunSettings):
    model: ModelOptions = field(default_factory=ModelOptions)  # the classifier to search
    target_class: Any = MISSING  # the class whose triggers to model
    method: str = "mesa"  # mesa | baseline (defend also: finetune)
    samples_per_level: int = 12  # triggers per level shown in samples.png
    data: DataSpec = field(default_factory=DataSpec)
    mesa: MESAConfig = field(default_factory=MESAConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    arch: ArchSpec | None = None
    store: S3Config = field(default_factory=S3Config)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method == "finetune" and "finetune" not in self.methods():
            raise ConfigError(
                "method=finetune searches no triggers (plain fine-tuning on the clean images): "
                "run it with gdm-ray defend method=finetune; search takes method=mesa or baseline"
            )
        if self.method not in self.methods():
            raise ConfigError(f"method={self.method!r} must be one of {', '.join(self.methods())}")
        _target(self.target_class, allow_auto=self.allows_auto())
        if self.target_class == "auto" and self.method == "baseline":
            raise ConfigError(f"target_class=auto scans with MESA; method={self.method} needs a class index")

    def allows_auto(self) -> bool:
        return False

    def methods(self) -> tuple[str, ...]:
        return SEARCH_METHODS


@dataclass
class DefendSettings(SearchSettings):
    reference: str | None = None  # a zoo-scan output folder: judge each class against the same class in its models
    dataset: str | None = None  # also add the Parquet rows to a dataset partitioned by run and model
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    scan: ScanConfig = field(default_factory=ScanConfig)  # with target_class=auto
    trigger: TriggerSpec | None = None  # the real trigger (for ASR before/after); None: the model card's

    def allows_auto(self) -> bool:
        return True

    def methods(self) -> tuple[str, ...]:
        return METHODS  # finetune too: the floor, no search (target_class=auto then scans nothing)


@dataclass
class _ScanGroups(RunSettings):
    """What scan and zoo-scan share: the scan's groups and outputs."""

    full_search: bool = True  # MESA on each flagged class
    samples_per_level: int = 12
    dataset: str | None = None
    data: DataSpec = field(default_factory=DataSpec)
    scan: ScanConfig = field(default_factory=ScanConfig)
    mesa: MESAConfig = field(default_factory=MESAConfig)
    arch: ArchSpec | None = None
    ray: RayConfig = field(default_factory=RayConfig)
    store: S3Config = field(default_factory=S3Config)


@dataclass
class ScanSettings(_ScanGroups):
    model: ModelOptions = field(default_factory=ModelOptions)
    reference: str | None = None  # a zoo-scan output folder: judge each class against the same class in its models
    use_ray: bool = False  # first-pass chunks and class searches as Ray tasks; same verdict

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.use_ray and self.reference:
            raise ConfigError(
                f"use_ray=true with reference={self.reference}: judging against a zoo runs in one process; "
                "drop use_ray (or zoo-scan the model with the zoo)"
            )


@dataclass
class ZooOptions:
    path: str = MISSING  # a folder or s3:// prefix of model files
    glob: str = "*"  # which files in zoo.path (model suffixes only)
    calibrate: bool = True  # with >= 3 models, judge each class against the same class in the other models
    examples: bool = True  # a model alone in its folder with clean-example-data/ (or clean_example_data/, examples/) is scanned on it
    min_examples: int = 100  # fewer own example images than this: the shared data= set (bench/min_examples.py)

    def __post_init__(self) -> None:
        if int(self.min_examples) < 2:  # a first pass needs images to search and images to measure
            raise ConfigError(f"zoo.min_examples={self.min_examples} must be >= 2")


@dataclass
class ZooScanSettings(_ScanGroups):
    zoo: ZooOptions = field(default_factory=ZooOptions)
    model: ModelReading = field(default_factory=ModelReading)  # how every model file of the zoo is read
    use_ray: bool = True  # first passes and full searches as Ray tasks; false: one process


@dataclass
class SweepSettings(RunSettings):
    model: ModelOptions = field(default_factory=ModelOptions)
    target_class: int = MISSING  # the class whose triggers MESA models
    dataset: str | None = None
    data: DataSpec = field(default_factory=DataSpec)
    mesa: MESAConfig = field(default_factory=MESAConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    trigger: TriggerSpec | None = None  # the real trigger, when the model has no card beside it
    arch: ArchSpec | None = None
    store: S3Config = field(default_factory=S3Config)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        _target(self.target_class)
        if self.device.startswith("cuda") and not float(self.ray.task_gpus) > 0:
            raise ConfigError(f"device={self.device} needs ray.task_gpus > 0 (each trial asks Ray for its GPU share)")


@dataclass
class Batching:
    """@serve.batch: concurrent requests gathered into one call."""

    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.0


@dataclass
class Autoscaling:
    """Serve's autoscaling of replicas by ongoing requests per replica."""

    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: int = 8


@dataclass
class ServeSettings(RunSettings):
    ensembles: list[str] = field(default_factory=list)  # URI or ID=URI, each an ensemble folder or s3:// prefix
    host: str = "127.0.0.1"
    port: int = 8000
    ingress: str = "auto"  # haproxy | proxy | auto (haproxy when installed)
    route_prefix: str = "/"
    token: str | None = None  # bearer token for /v1/* (configs/serve.yaml reads $GDM_RAY_TOKEN)
    max_n: int = 4096
    max_png_n: int = 1024
    batching: Batching = field(default_factory=Batching)
    autoscaling: Autoscaling | None = field(default_factory=Autoscaling)
    max_ongoing_requests: int = 64
    access_log: bool = False
    app_name: str = "gdm-ray"
    ray: RayConfig = field(default_factory=RayConfig)
    store: S3Config = field(default_factory=S3Config)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"port={self.port!r} must be an integer in 1..65535")


@dataclass
class DemoZoo:
    clean: int = 2  # clean models beside the backdoored one
    full_search: bool = False  # the repair step models the flagged class's triggers with the full MESA budget


@dataclass
class DemoSettings(AttackSettings):
    """attack's settings (the zoo's models are trained with them) and the later steps' groups."""

    mesa: MESAConfig = field(default_factory=MESAConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    scan: ScanConfig = field(default_factory=ScanConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    zoo: DemoZoo = field(default_factory=DemoZoo)


SCHEMAS: dict[str, type] = {
    "attack": AttackSettings,
    "evaluate": EvaluateSettings,
    "search": SearchSettings,
    "defend": DefendSettings,
    "scan": ScanSettings,
    "zoo-scan": ZooScanSettings,
    "sweep": SweepSettings,
    "serve": ServeSettings,
    "demo": DemoSettings,
}

# groups whose only option is their dataclass's defaults
GROUP_DEFAULTS: dict[str, type] = {
    "mesa": MESAConfig,
    "scan": ScanConfig,
    "defense": DefenseConfig,
    "baseline": BaselineConfig,
    "ray": RayConfig,
    "store": S3Config,
}


def register() -> None:
    """Put the schemas and the group defaults in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    for command, cls in SCHEMAS.items():
        cs.store(name=f"{command.replace('-', '_')}_schema", node=cls)
    for group, cls in GROUP_DEFAULTS.items():
        cs.store(group=group, name="default", node=cls)


def settings(cfg: DictConfig) -> Any:
    """The composed config as its command's settings dataclass (values checked).
    Hydra's ``+key=value`` can add a key a schema does not have, and
    to_object would drop it silently: an unknown key is an error here."""
    _refuse_unknown(cfg, "")
    return OmegaConf.to_object(cfg)


def _refuse_unknown(node: Any, path: str) -> None:
    if not isinstance(node, DictConfig):
        return
    schema = OmegaConf.get_type(node)
    known = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    for key in node.keys():
        if known is not None and key not in known:
            raise ConfigError(f"{path}{key}: unknown key (known: {', '.join(sorted(known))})")
        _refuse_unknown(node._get_node(key), f"{path}{key}.")


def build(cls: type[T], values: Any, where: str) -> T:
    """A config dataclass from plain values (a model card's trigger, a sweep
    trial's group), type-checked as Hydra checks the command line."""
    node = OmegaConf.structured(cls)
    try:
        merged = OmegaConf.merge(node, values if values is not None else {})
    except Exception as exc:  # OmegaConf's validation errors name the key
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{where}: {first}") from None
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def plain(value: Any) -> Any:
    """Settings (or any dataclass) as plain data, S3 credentials masked: it is written into outputs."""
    out = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    store = out.get("store") if isinstance(out, dict) else None
    if isinstance(store, dict):
        out["store"] = {k: ("***" if k in _SECRETS and v else v) for k, v in store.items()}
    return out


_SECRETS = ("access_key_id", "secret_access_key", "session_token")
