"""A sweep's search space: SPACE.yaml read, and every value checked by the config schema before any trial starts.

SPACE.yaml maps config keys to a sampler, written as Ray Tune names them:

    optim.lr: loguniform(1e-4, 1e-2)        # log-uniform between the bounds
    model.latent_dim: choice(5, 10, 20)     # one of the values, at random
    train.estimator: grid(B, iwae)          # every value, each with every other grid's (a grid search)
    train.kl_warmup_steps: randint(0, 5000) # an integer, the upper bound excluded (Tune's randint)
    train.free_bits: uniform(0.0, 0.5)
    optim.name: adam                        # a plain value: the same in every trial

Pure Python and the config: Ray Tune's objects are made from a `Space` by `sweep/tuning.py`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import yaml

from aevb_dist.config import config_with
from aevb_dist.config.schema import Config

SAMPLERS = ("grid", "choice", "uniform", "loguniform", "randint")
_CALL = re.compile(r"^\s*([a-z_]+)\s*\((.*)\)\s*$", re.DOTALL)


@dataclass(frozen=True)
class Dimension:
    key: str  # a config key, dotted: optim.lr
    sampler: str  # one of SAMPLERS, or "fixed"
    values: tuple  # grid/choice/fixed: the values; uniform/loguniform/randint: (low, high)

    @property
    def is_log(self) -> bool:
        return self.sampler == "loguniform"


@dataclass(frozen=True)
class Space:
    dimensions: tuple[Dimension, ...]

    @property
    def keys(self) -> list[str]:
        return [d.key for d in self.dimensions]

    @property
    def searched(self) -> list[Dimension]:
        """The dimensions whose value differs between trials."""
        return [d for d in self.dimensions if d.sampler != "fixed"]

    @property
    def grid_size(self) -> int:
        size = 1
        for d in self.dimensions:
            if d.sampler == "grid":
                size *= len(d.values)
        return size


def override(key: str, value: Any) -> str:
    """`key=value` as `load_config` reads it (JSON is YAML: strings quoted, lists and null as they are)."""
    return f"{key}={json.dumps(value)}"


def read_space(path: str) -> Space:
    """SPACE.yaml as a `Space`; a file that is not a mapping of keys to samplers is one line."""
    try:
        with open(path) as f:
            loaded = yaml.safe_load(f)
    except FileNotFoundError:
        raise ValueError(f"search space file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"search space {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(loaded, dict) or not loaded:
        raise ValueError(
            f"search space {path} must map config keys to samplers, e.g. 'optim.lr: loguniform(1e-4, 1e-2)'"
        )
    loaded = _flatten(loaded)
    return Space(tuple(_dimension(path, key, spec) for key, spec in loaded.items()))


def _flatten(tree: dict, prefix: str = "") -> dict:
    """`optim: {lr: ...}` and `optim.lr: ...` alike."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _dimension(path: str, key: str, spec: Any) -> Dimension:
    where = f"search space {path}: {key}"
    match = _CALL.match(spec) if isinstance(spec, str) else None
    if match is None or match.group(1) not in SAMPLERS:
        if isinstance(spec, str) and match is not None:
            raise ValueError(f"{where}: unknown sampler '{match.group(1)}'; use one of: {', '.join(SAMPLERS)}")
        return Dimension(key, "fixed", (spec,))
    sampler = match.group(1)
    try:
        args = [_number(a) for a in yaml.safe_load(f"[{match.group(2)}]")]
    except yaml.YAMLError:
        raise ValueError(f"{where}: cannot read the arguments of {spec!r}") from None
    if sampler in ("grid", "choice"):
        if not args:
            raise ValueError(f"{where}: {sampler}() needs at least one value")
        return Dimension(key, sampler, tuple(args))
    if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        raise ValueError(f"{where}: {sampler}(low, high) takes two numbers, got {spec!r}")
    low, high = args
    if not low < high:
        raise ValueError(f"{where}: {sampler}(low, high) needs low < high, got {spec!r}")
    if sampler == "loguniform" and low <= 0:
        raise ValueError(f"{where}: loguniform(low, high) needs 0 < low, got {spec!r}")
    if sampler == "randint" and not all(isinstance(a, int) for a in args):
        raise ValueError(f"{where}: randint(low, high) takes integers, got {spec!r}")
    return Dimension(key, sampler, (low, high))


def _number(value: Any) -> Any:
    """YAML 1.1 reads 1e-4 (no dot) as a string: numbers as numbers."""
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return value


def extreme_values(d: Dimension) -> list:
    """The values of `d` the schema is asked about: every listed value, or both ends of a range."""
    if d.sampler in ("grid", "choice", "fixed"):
        return list(d.values)
    low, high = d.values
    if d.sampler == "randint":
        return [low, high - 1]  # Tune's randint leaves the upper bound out
    middle = (low * high) ** 0.5 if d.is_log else (low + high) / 2
    return [low, float(middle), high]  # a float between: uniform(2, 8) for an integer key is refused


def check_space(base: Config, space: Space, path: str) -> None:
    """Every value a trial may take, checked by the config schema, one key at a time from `base`: a key the
    schema does not have, or a value it refuses, is one line naming the key, before any trial starts."""
    for d in space.dimensions:
        for value in extreme_values(d):
            try:
                config_with(base, [override(d.key, value)])
            except ValueError as err:
                raise ValueError(f"search space {path}: {d.key}={json.dumps(value)}: {err}") from None


def trial_overrides(space: Space, values: dict) -> list[str]:
    """A trial's `key=value` overrides from the values Tune chose (keyed by config key)."""
    return [override(d.key, values[d.key]) for d in space.dimensions]
