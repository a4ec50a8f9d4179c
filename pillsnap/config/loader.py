"""One place where configuration is merged and validated: defaults < config file < $PILLSNAP_DATA_ROOT < dotted
overrides. Stage overrides never replace a key given on the command line.

`.env` only fills `serving.*` keys that the merged config leaves null (API keys stay out of YAML). Every `paths.*`
value comes out absolute: relative ones resolve against the working directory (a config file's own relative paths
against `paths_base` when given), so a run's saved config works from any directory.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pillsnap.config.ranges import out_of_range
from pillsnap.config.stage import STAGE_OVERRIDE_TARGETS, converted_override, drop_overridden

LOGGER = logging.getLogger(__name__)
DEFAULT_CONFIG = Path(__file__).with_name("default.yaml")
REQUIRED_OOM_KEYS = ("max_retries", "max_grad_accum", "min_batch", "cooldown_sec", "escalate_to_fp16")
STAGE_OVERRIDE_KEYS = tuple(STAGE_OVERRIDE_TARGETS)
ENV_PREFIX = "PILLSNAP_SERVING_"
# The data root of the machine (as the Stage 3 guide exports it); an explicit paths.data_root=... still wins.
DATA_ROOT_ENV = "PILLSNAP_DATA_ROOT"


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message names the key."""


def _leaf_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        keys.append(dotted)
        if isinstance(value, DictConfig):
            keys.extend(_leaf_keys(value, dotted + "."))
    return keys


def _suggest(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def _unknown_keys(cfg: DictConfig, reference: DictConfig, prefix: str = "") -> list[str]:
    """Dotted keys of `cfg` that `reference` lacks (open sections like stage_overrides excepted)."""
    unknown = []
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        if dotted.startswith("train.stage_overrides."):
            continue
        if key not in reference:
            unknown.append(dotted)
        elif isinstance(value, DictConfig) and isinstance(reference[key], DictConfig):
            unknown.extend(_unknown_keys(value, reference[key], dotted + "."))
    return unknown


def _check_known(cfg: DictConfig, reference: DictConfig, origin: str) -> None:
    unknown = _unknown_keys(cfg, reference)
    if unknown:
        known = _leaf_keys(reference)
        key = unknown[0]
        raise ConfigError(f"Unknown config key '{key}' in {origin}.{_suggest(key, known)}")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _compatible(default: Any, value: Any) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) == isinstance(value, bool)
    if isinstance(default, float) and isinstance(value, int):
        return True
    if isinstance(default, (int, float)) and isinstance(value, (int, float)):
        return isinstance(value, type(default))
    return isinstance(value, type(default))


def _check_types(cfg: DictConfig, reference: DictConfig, prefix: str = "") -> None:
    for key in cfg:
        dotted = f"{prefix}{key}"
        if key not in reference or dotted.startswith("train.stage_overrides"):
            continue
        value, default = cfg[key], reference[key]
        if isinstance(default, DictConfig):
            if not isinstance(value, DictConfig):
                raise ConfigError(f"Config key '{dotted}' must be a section (mapping), got {value!r}.")
            _check_types(value, default, dotted + ".")
        elif isinstance(default, ListConfig):
            if value is not None and not isinstance(value, ListConfig):
                raise ConfigError(f"Config key '{dotted}' must be a list, got {_type_name(value)} {value!r}.")
        elif not _compatible(default, value):
            raise ConfigError(
                f"Config key '{dotted}' must be {_type_name(default)}, got {_type_name(value)} {value!r}."
            )


def check_ranges(cfg: DictConfig) -> None:
    """ConfigError naming every number of `cfg` outside its range (pillsnap.config.ranges); also for a config
    changed after loading (stage overrides, code)."""
    values = {key: OmegaConf.select(cfg, key) for key in _leaf_keys(cfg)}
    bad = out_of_range({key: value for key, value in values.items() if not isinstance(value, DictConfig)})
    if bad:
        raise ConfigError("; ".join(bad) + ".")


def check_tf32(cfg: DictConfig) -> None:
    """TF32 is one switch for the whole process in PyTorch: when both models train, their sections must agree (else
    the one built last would decide for both without a word). Checked when a run trains, not when a trained run's
    config is read (for serving, evaluation), which training never uses again."""
    strategy = str(OmegaConf.select(cfg, "train.strategy", default="interleaved"))
    if strategy == "classification":
        return
    # a key a partial config lacks takes the default (true): only two values given and different are refused
    cls, det = (bool(OmegaConf.select(cfg, f"train.{task}.tf32", default=True)) for task in ("classification",
                                                                                              "detection"))
    if cls != det:
        raise ConfigError(f"train.classification.tf32 ({str(cls).lower()}) and train.detection.tf32 "
                          f"({str(det).lower()}) differ, but TF32 is one switch for the whole process in PyTorch "
                          f"and both models train (train.strategy={strategy}): set both the same")


def _check_oom_section(user_cfg: DictConfig, origin: str) -> None:
    oom = OmegaConf.select(user_cfg, "train.oom")
    for key in REQUIRED_OOM_KEYS:
        if oom is None or key not in oom or oom[key] is None:
            raise ConfigError(
                f"Missing required config key 'train.oom.{key}' in {origin}: the five train.oom keys "
                f"({', '.join(REQUIRED_OOM_KEYS)}) guard OOM recovery and must be set explicitly."
            )


def _check_stage_overrides(cfg: DictConfig) -> None:
    for stage, overrides in (cfg.train.stage_overrides or {}).items():
        for key in overrides or {}:
            if key not in STAGE_OVERRIDE_KEYS:
                raise ConfigError(
                    f"Unknown stage override 'train.stage_overrides.{stage}.{key}'."
                    f"{_suggest(key, STAGE_OVERRIDE_KEYS)}"
                )
            try:  # a value the stage could not apply stops the command now, not when the stage starts
                converted_override(key, overrides[key])
            except (TypeError, ValueError) as err:
                raise ConfigError(f"train.stage_overrides.{stage}.{key}={overrides[key]!r}: {err}") from err


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"Config file not found: {path}")
    try:
        loaded = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException, OSError) as err:
        raise ConfigError(f"Cannot parse config file {path}: {err}") from err
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"Config file {path} must hold a mapping at the top level.")
    return loaded


def _parse_overrides(overrides: Iterable[str]) -> DictConfig:
    overrides = list(overrides)
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"Bad override '{item}': expected dotted.key=value, e.g. train.batch_size=128.")
    try:
        return OmegaConf.from_dotlist(overrides)
    except OmegaConfBaseException as err:
        raise ConfigError(f"Bad override in {overrides}: {err}") from err


def read_dotenv(path: str | Path = ".env") -> dict[str, str]:
    """Parse KEY=VALUE lines of a .env file (comments and blanks skipped); missing file -> {}."""
    path = Path(path)
    if not path.is_file():
        return {}
    values = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        values[key.strip().removeprefix("export ").strip()] = value.strip().strip("'\"")
    return values


def _apply_dotenv(cfg: DictConfig, env: dict[str, str]) -> None:
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX):].lower()
        if key in cfg.serving and cfg.serving[key] is None:
            cfg.serving[key] = value


def _data_root_from_env(cli: DictConfig) -> DictConfig:
    root = os.environ.get(DATA_ROOT_ENV)
    if not root or OmegaConf.select(cli, "paths.data_root") is not None:
        return OmegaConf.create()
    LOGGER.info("paths.data_root=%s (from $%s)", root, DATA_ROOT_ENV)
    return OmegaConf.create({"paths": {"data_root": root}})


def _absolute_paths(cfg: DictConfig, cli: DictConfig, paths_base: Path) -> None:
    """Make every paths.* value absolute: command-line values against the working directory, the rest against
    `paths_base`."""
    for key, value in cfg.paths.items():
        if value is None or Path(str(value)).expanduser().is_absolute():
            cfg.paths[key] = None if value is None else str(Path(str(value)).expanduser())
            continue
        base = Path.cwd() if OmegaConf.select(cli, f"paths.{key}") is not None else paths_base
        cfg.paths[key] = str(Path(os.path.normpath(base.absolute() / str(value))))


def load_config(
    cfg_path: str | Path | None = None,
    overrides: Iterable[str] = (),
    dotenv_path: str | Path | None = ".env",
    paths_base: str | Path | None = None,
) -> DictConfig:
    """Merge defaults < `cfg_path` < $PILLSNAP_DATA_ROOT < dotted `overrides`, fill serving keys from .env, validate.

    Relative `paths.*` from the file resolve against `paths_base` (default: the working directory). Raises
    ConfigError naming the offending key (unknown key with a suggestion, wrong type, a number out of its range,
    missing train.oom key).
    """
    defaults = _read_yaml(DEFAULT_CONFIG)
    layers = [defaults]
    if cfg_path is not None:
        user = _read_yaml(Path(cfg_path))
        _check_known(user, defaults, str(cfg_path))
        _check_oom_section(user, str(cfg_path))
        layers.append(user)
    cli = _parse_overrides(overrides)
    _check_known(cli, defaults, "command-line overrides")
    layers += [_data_root_from_env(cli), cli]
    cfg = OmegaConf.merge(*layers)
    _check_types(cfg, defaults)
    check_ranges(cfg)
    _check_oom_section(cfg, "the merged config")
    _check_stage_overrides(cfg)
    drop_overridden(cfg, _leaf_keys(cli))
    _absolute_paths(cfg, cli, Path(paths_base) if paths_base is not None else Path.cwd())
    if dotenv_path is not None:
        _apply_dotenv(cfg, {**read_dotenv(dotenv_path), **_environ_serving()})
    return cfg


def _environ_serving() -> dict[str, str]:
    # Process environment wins over the .env file, as with python-dotenv's default.
    return {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX)}


def config_to_dict(cfg: DictConfig) -> dict:
    """Plain-dict snapshot (for checkpoints and reports)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
