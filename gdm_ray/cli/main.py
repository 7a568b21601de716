"""The console script: ``gdm-ray <command> key=value ...`` (Hydra overrides).

Each command has one primary config, ``configs/<command>.yaml``; this entry
point composes it with the overrides, seeds the global RNGs (the only place
that does), runs the command and turns input errors into one line on stderr
with a non-zero exit.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Any

__all__ = ["main", "COMMANDS", "Command"]


@dataclass(frozen=True)
class Command:
    """One entry of the command registry: what `gdm-ray --help` says and the
    function (``module:function``, imported only when the command runs) that
    takes the command's typed settings and returns its metrics."""

    help: str
    target: str

    def run(self, settings: Any) -> dict[str, Any]:
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)(settings)


# the one command registry; each command's settings: gdm_ray.cli.settings.SCHEMAS
COMMANDS = {
    "attack": Command("train a backdoored classifier (BadNets poisoning); writes model.pt + model.json", "gdm_ray.cli.attack:attack"),
    "evaluate": Command("clean accuracy and attack success rate of a model for a trigger", "gdm_ray.cli.evaluate:evaluate"),
    "search": Command("model the valid triggers of one class (MESA) or reverse-engineer one (baseline)", "gdm_ray.cli.search:search"),
    "scan": Command("is the model backdoored, to which class(es)? a verdict table, PNGs and Parquet rows", "gdm_ray.cli.scan:scan"),
    "zoo-scan": Command("scan every model file in a folder: verdicts.parquet, classes.parquet, scores.png", "gdm_ray.cli.zoo:zoo_scan"),
    "defend": Command(
        "repair a model by retraining against the found triggers; writes the model (its own format) + metrics.json",
        "gdm_ray.cli.search:defend",
    ),
    "sweep": Command(
        "Ray Tune sweep of MESA's alpha, trigger size (N, betas, ...) scored by the defense; trials.parquet", "gdm_ray.cli.sweep:sweep"
    ),
    "serve": Command("HTTP endpoint (Ray Serve) that samples triggers from MESA ensembles: POST /v1/sample", "gdm_ray.cli.serve:serve"),
    "demo": Command("the end-to-end main job on the embedded default", "gdm_ray.cli.demo:demo"),
}

USAGE = """usage: gdm-ray <command> [key=value ...] [--cfg job] [--help]

Commands:
{commands}
  trojai{pad}  TrojAI's detector interface: `gdm-ray trojai infer|configure|mitigate --help` (its own flags)

Overrides are Hydra syntax: data=cifar10 trigger=color3x3 attack.target_class=3 out=DIR.
`gdm-ray <command> --help` shows the command's config; `--cfg job` prints the
composed config without running.
"""

EXIT_USAGE = 2
EXIT_INPUT = 1


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = "\n".join(f"  {c.ljust(width)}  {d.help}" for c, d in COMMANDS.items())
    return USAGE.format(commands=lines, pad=" " * (width - len("trojai")))


def _error(msg: str, code: int) -> int:
    print(f"gdm-ray: error: {msg}", file=sys.stderr)
    return code


def _parse(rest: list[str]) -> tuple[list[str], bool, bool]:
    """(overrides, show help, print the config) from the words after the command."""
    show_help = any(a in ("-h", "--help") for a in rest)
    print_cfg = False
    overrides = []
    it = iter(rest)
    for a in it:
        if a in ("-h", "--help"):
            continue
        if a == "--cfg":
            kind = next(it, "job")
            if kind != "job":
                raise _UsageError(f"--cfg {kind}: only '--cfg job' is supported")
            print_cfg = True
        elif a.startswith("-"):
            raise _UsageError(f"unknown option {a!r}; overrides are key=value")
        else:
            overrides.append(a)
    return overrides, show_help, print_cfg


class _UsageError(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if args else EXIT_USAGE
    from gdm_ray.store.provenance import code_version

    if args[0] in ("-V", "--version"):
        print(f"gdm-ray {code_version()}")
        return 0
    command, rest = args[0], args[1:]
    if command == "trojai":  # TrojAI's fixed flags, not Hydra overrides
        from gdm_ray.cli.trojai import main as trojai

        return trojai(rest)
    if command not in COMMANDS:
        return _error(f"unknown command {command!r} (commands: {', '.join(COMMANDS)})", EXIT_USAGE)
    code_version()  # the checkout as it is now, when the code runs: a commit made during a long run is not this code
    try:
        overrides, show_help, print_cfg = _parse(rest)
    except _UsageError as exc:
        return _error(str(exc), EXIT_USAGE)
    return _run(command, overrides, show_help, print_cfg)


def _run(command: str, overrides: list[str], show_help: bool, print_cfg: bool) -> int:
    """Compose, check and type the settings, then run the command."""
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

    from gdm_ray.cli.compose import compose_config
    from gdm_ray.cli.settings import settings
    from gdm_ray.core.errors import GdmRayError

    try:
        cfg = compose_config(command, overrides)
        if show_help or print_cfg:
            if show_help:
                print(f"gdm-ray {command}: {COMMANDS[command].help}\n\nConfig (override any key with key=value):\n")
            print(OmegaConf.to_yaml(cfg), end="")
            return 0
        typed = settings(cfg)  # every value checked before any work starts
    except GdmRayError as exc:  # a value the settings' checks refuse
        return _error(_one_line(exc), EXIT_INPUT)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        # a value of the wrong type or an unknown key is bad input; a missing (???) value or a bad override is usage
        bad_value = isinstance(exc.__cause__ or exc, (ValidationError, ConfigKeyError))
        return _error(_one_line(exc), EXIT_INPUT if bad_value else EXIT_USAGE)
    try:
        COMMANDS[command].run(typed)
    except GdmRayError as exc:
        return _error(_one_line(exc), EXIT_INPUT)
    except KeyboardInterrupt:
        return _error("interrupted; no partial output was published", 130)
    return 0


def _one_line(exc: BaseException) -> str:
    """The line that names the problem; a Hydra override error gets its cause's
    first line too (which key, which type)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    # OmegaConf appends "full_key: ..., object_type=..." lines; keep what names the problem.
    head = lines[0] if lines else type(exc).__name__
    key = next((ln for ln in lines[1:] if ln.startswith("full_key:")), "")
    cause = exc.__cause__
    if cause is not None and str(cause).strip() and "full_key" not in head:
        return f"{head.rstrip('.')}: {_one_line(cause)}"
    return f"{head} ({key.split(',')[0]})" if key and "full_key" not in head else head


if __name__ == "__main__":
    sys.exit(main())
