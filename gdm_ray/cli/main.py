"""The console script: ``gdm-ray <command> key=value ...`` (Hydra overrides).

Each command has one primary config, ``configs/<command>.yaml``; this entry
point composes it with the overrides, seeds the global RNGs (the only place
that does), runs the command and turns input errors into one line on stderr
with a non-zero exit.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["main", "compose_config", "config_dir", "COMMANDS"]

# command -> one-line description (what `gdm-ray --help` lists)
COMMANDS = {
    "attack": "train a backdoored classifier (BadNets poisoning); writes model.pt + model.json",
    "evaluate": "clean accuracy and attack success rate of a model for a trigger",
    "search": "model the valid triggers of one class (MESA) or reverse-engineer one (baseline)",
    "scan": "is the model backdoored, to which class(es)? a verdict table, PNGs and Parquet rows",
    "zoo-scan": "scan every model file in a folder: verdicts.parquet, classes.parquet, scores.png",
    "defend": "repair a model by retraining against the found triggers; writes model.pt + metrics.json",
    "sweep": "Ray Tune sweep of MESA's alpha, trigger size (N, betas, ...) scored by the defense; trials.parquet",
    "serve": "HTTP endpoint (Ray Serve) that samples triggers from MESA ensembles: POST /v1/sample",
    "demo": "the end-to-end main job on the embedded default",
}

USAGE = """usage: gdm-ray <command> [key=value ...] [--cfg job] [--help]

Commands:
{commands}

Overrides are Hydra syntax: data=cifar10 trigger=color3x3 attack.target=3 out=DIR.
`gdm-ray <command> --help` shows the command's config; `--cfg job` prints the
composed config without running.
"""

EXIT_USAGE = 2
EXIT_INPUT = 1


def config_dir() -> Path:
    """configs/ of this checkout, or $GDM_RAY_CONFIG_DIR."""
    env = os.environ.get("GDM_RAY_CONFIG_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "configs"
    if not path.is_dir():
        raise FileNotFoundError(f"config folder {path} not found (set GDM_RAY_CONFIG_DIR)")
    return path


def compose_config(command: str, overrides: list[str]):
    """Compose configs/<command>.yaml with Hydra overrides (no run)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name=command):
        cfg = compose(config_name=command, overrides=overrides)
    OmegaConf.resolve(cfg)
    return cfg


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = "\n".join(f"  {c.ljust(width)}  {d}" for c, d in COMMANDS.items())
    return USAGE.format(commands=lines)


def _error(msg: str, code: int) -> int:
    print(f"gdm-ray: error: {msg}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if args else EXIT_USAGE
    if args[0] in ("-V", "--version"):
        from gdm_ray.store.provenance import code_version

        print(f"gdm-ray {code_version()}")
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        return _error(f"unknown command {command!r} (commands: {', '.join(COMMANDS)})", EXIT_USAGE)
    from gdm_ray.store.provenance import code_version

    code_version()  # the checkout as it is now, when the code runs: a commit made during a long run is not this code
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
                return _error(f"--cfg {kind}: only '--cfg job' is supported", EXIT_USAGE)
            print_cfg = True
        elif a.startswith("-"):
            return _error(f"unknown option {a!r}; overrides are key=value", EXIT_USAGE)
        else:
            overrides.append(a)

    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = compose_config(command, overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        return _error(_one_line(exc), EXIT_USAGE)
    if show_help or print_cfg:
        if show_help:
            print(f"gdm-ray {command}: {COMMANDS[command]}\n\nConfig (override any key with key=value):\n")
        print(OmegaConf.to_yaml(cfg), end="")
        return 0

    from gdm_ray.cli import commands
    from gdm_ray.core.errors import GdmRayError

    try:
        commands.run(command, cfg)
    except GdmRayError as exc:
        return _error(_one_line(exc), EXIT_INPUT)
    except OmegaConfBaseException as exc:
        # e.g. a required value (???) left unset
        return _error(_one_line(exc), EXIT_USAGE)
    except KeyboardInterrupt:
        return _error("interrupted; no partial output was published", 130)
    return 0


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    # OmegaConf appends "full_key: ..., object_type=..." lines; keep what names the problem.
    head = lines[0] if lines else type(exc).__name__
    key = next((ln for ln in lines[1:] if ln.startswith("full_key:")), "")
    return f"{head} ({key.split(',')[0]})" if key and "full_key" not in head else head


if __name__ == "__main__":
    sys.exit(main())
