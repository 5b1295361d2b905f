"""`load_config`: the schema (`config/schema.py`) merged with a YAML file and `key=value` overrides, then
checked (`config/checks.py`).

Building a config has no side effects: no environment variables are set, no
directories created. Every user mistake is a `ValueError` naming the key and
what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from aevb_dist.config.checks import validate
from aevb_dist.config.schema import Config, LatentLayerConfig, ModelConfig
from aevb_dist.run.uri import absolute_tracking_uri, absolute_uri


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Schema ← YAML file at `path` ← `key=value` overrides; validated across fields."""
    return _with_overrides(_load_yaml(path) if path is not None else None, overrides)


def config_with(base: Config, overrides: list[str]) -> Config:
    """`base` ← `key=value` overrides, validated as `load_config` validates: a sweep's trial."""
    return _with_overrides(OmegaConf.create(to_dict(base)), overrides)


def _with_overrides(start, overrides: Optional[list[str]]) -> Config:
    merged = OmegaConf.structured(Config)
    try:
        if start is not None:
            merged = OmegaConf.merge(merged, start)
        for item in overrides or []:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([_check_override(item)]))
        merged = _length_override_wins(merged, overrides or [])
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ValueError(_explain(err)) from None
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from `to_dict` output (used by workers and checkpoints)."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), data))
    except OmegaConfBaseException as err:
        raise ValueError(_explain(err)) from None


def unused_keys(cfg: Config) -> list[str]:
    """Keys set away from their defaults that this config does not read: a line each, for the driver to say.
    Not refused: a base config (configs/smoke.yaml) may set them for its one-layer model."""
    m, default = cfg.model, ModelConfig()
    changed = [f"model.{k}" for k in ("latent_dim", "hidden_sizes") if getattr(m, k) != getattr(default, k)]
    if m.latent_layers and changed:
        return [f"{' and '.join(changed)} not used: model.latent_layers sets each layer's latent_dim and hidden_sizes"]
    return []


def absolute_local_uris(cfg: Config) -> Config:
    """A copy whose local paths are absolute: workers, Ray tasks and jobs run in other folders."""
    cfg = config_from_dict(to_dict(cfg))
    for section, key in (("data", "train_uri"), ("data", "test_uri"), ("run", "storage_uri")):
        value = getattr(getattr(cfg, section), key)
        if value:
            setattr(getattr(cfg, section), key, absolute_uri(value))
    if cfg.tracking.mlflow_uri:
        cfg.tracking.mlflow_uri = absolute_tracking_uri(cfg.tracking.mlflow_uri)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _load_yaml(path: str):
    try:
        loaded = OmegaConf.load(path)
    except FileNotFoundError:
        raise ValueError(f"config file not found: {path}") from None
    except OmegaConfBaseException as err:
        raise ValueError(f"config file {path} is not valid YAML: {err}") from None
    except Exception as err:  # yaml.YAMLError and friends
        raise ValueError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not OmegaConf.is_dict(loaded):
        raise ValueError(f"config file {path} must hold a mapping of sections, got {type(loaded).__name__}")
    return loaded


def _length_override_wins(merged, overrides: list[str]):
    """`train.max_steps=N` on the command line replaces a file's `train.num_epochs`, and vice versa."""
    keys = {item.split("=", 1)[0].strip() for item in overrides}
    for given, other in (("max_steps", "num_epochs"), ("num_epochs", "max_steps")):
        if f"train.{given}" in keys and f"train.{other}" not in keys:
            merged.train[other] = None
    return merged


def _check_override(item: str) -> str:
    if "=" not in item or item.startswith("="):
        raise ValueError(f"override {item!r} must look like key=value, e.g. train.max_steps=100")
    return item


def _explain(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or ""
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)) or "not in struct" in str(err):
        section, _, leaf = key.rpartition(".")
        allowed = _allowed_keys(section)
        holder = getattr(err, "object_type", None)
        if holder is LatentLayerConfig:  # an item of a list: OmegaConf's key does not say which list
            key, section, allowed = f"model.latent_layers[].{leaf}", "each model.latent_layers item", _fields(holder)
        guess = _closest_key(key, section, allowed)
        return (
            f"unknown config key '{key}'{f' (did you mean {guess}?)' if guess else ''}; "
            f"allowed keys{' in ' + section if section else ''}: {', '.join(allowed)}"
        )
    if isinstance(err, ValidationError):
        first = str(err).splitlines()[0]
        return f"config key '{key}' has the wrong type: {first}"
    return f"invalid config{' at ' + key if key else ''}: {str(err).splitlines()[0]}"


def _closest_key(key: str, section: str, allowed: list[str]) -> Optional[str]:
    """The key a mistyped one most likely meant: a near spelling in its own section, else the one key of that
    name in another section (model.max_steps: train.max_steps); None where no guess is a good one."""
    leaf = key.rpartition(".")[2]
    near = difflib.get_close_matches(leaf, allowed, n=1, cutoff=0.75)
    if near:
        return f"{section}.{near[0]}" if section and "[]" not in section and " " not in section else near[0]
    elsewhere = [k for k in _all_keys(Config) if k.rpartition(".")[2] == leaf]
    return elsewhere[0] if len(elsewhere) == 1 else None


def _all_keys(schema: type, prefix: str = "") -> list[str]:
    """Every leaf key of the schema, dotted (model.latent_dim, ...)."""
    keys = []
    for f in dataclasses.fields(schema):
        node = _field_type(schema, f)
        if dataclasses.is_dataclass(node):
            keys += _all_keys(node, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _allowed_keys(section: str) -> list[str]:
    node: Any = Config
    for part in filter(None, section.split(".")):
        found = {f.name: f for f in dataclasses.fields(node)}.get(part)
        node = _field_type(node, found) if found is not None else None
        if node is None or not dataclasses.is_dataclass(node):
            return []
    return _fields(node)


def _fields(schema: type) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)]


def _field_type(schema: type, f: dataclasses.Field) -> Any:
    """A field's type, resolved in the schema's own module (its annotations are strings)."""
    return typing.get_type_hints(schema)[f.name]
