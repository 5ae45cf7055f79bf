"""Reading configs from YAML and `key=value` overrides into typed dataclasses.

Every value is checked against its field's type hint, and an unknown key gets a "did you mean"
hint, so `loss.bta=0.2` fails at once instead of being ignored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from collections.abc import Callable
from difflib import get_close_matches
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from prefopt.config import ExperimentConfig
from prefopt.errors import ConfigError

T = TypeVar("T")

ALIASES = {"resume": "output.resume", "output_dir": "output.dir", "model": "model.name_or_path"}
"""Short top-level keys accepted in overrides (`resume=latest`)."""


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    fixed: dict[str, Any] | None = None,
    fixed_by: str = "",
) -> ExperimentConfig:
    """Build and validate a config from a YAML file and `key=value` overrides.

    Args:
        path: YAML file (None: all defaults).
        overrides: Strings like "loss.beta=0.2"; values are parsed as YAML ("true", "[a, b]").
        fixed: Settings a command imposes (`prefopt sft`: data.sft=true, loss.name=sft). A
            different value in the file or the overrides is refused, never silently replaced.
        fixed_by: The command that fixes them, for the error message.

    Returns:
        A validated ExperimentConfig.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    for item in overrides or []:
        _apply_override(raw, item)
    for key, value in (fixed or {}).items():
        _impose(raw, key, value, fixed_by)
    cfg = from_dict(ExperimentConfig, raw, where="")
    cfg.validate()
    return cfg


def _impose(raw: dict[str, Any], key: str, value: Any, command: str) -> None:
    """Set `key` to `value`, refusing a user value that differs (a one-item list counts as
    its item: `loss.name: [sft]` is `sft`)."""
    *sections, leaf = key.split(".")
    node = _section(
        raw, sections, lambda part, got: f"'{part}' must be a section (a mapping), got {got!r}"
    )
    given = node.get(leaf)
    if isinstance(given, list) and len(given) == 1:
        given = given[0]
    if given is not None and given != value:
        raise ConfigError(
            f"{command} sets {key}={value}; the config asks for {key}={node[leaf]}. Remove "
            f"that setting, or use prefopt train for another loss"
        )
    node[leaf] = value


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value (e.g. loss.beta=0.2)")
    key, _, text = item.partition("=")
    key = ALIASES.get(key.strip(), key.strip())
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    *sections, leaf = key.split(".")
    node = _section(raw, sections, lambda part, _: f"override '{item}': '{part}' is not a section")
    node[leaf] = value


def _section(
    raw: dict[str, Any], parts: list[str], not_a_section: Callable[[str, Any], str]
) -> dict[str, Any]:
    """The mapping at `parts` inside `raw`, creating absent sections (or YAML sections whose
    keys are all commented out, which load as None); a non-mapping on the way is a
    ConfigError with `not_a_section(part, value)`."""
    node = raw
    for part in parts:
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            raise ConfigError(not_a_section(part, node[part]))
        node = node[part]
    return node


def from_dict(cls: type[T], data: Any, *, where: str) -> T:
    """Build dataclass `cls` from a mapping, checking keys and value types.

    Args:
        cls: A dataclass type.
        data: Mapping of field name to value (nested mappings for nested dataclasses).
        where: Dotted prefix for error messages.
    """
    if data is None:  # a YAML section whose keys are all commented out: all defaults
        data = {}
    if not isinstance(data, dict):
        section = where.rstrip(".") or "config"
        raise ConfigError(f"{section}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{where}{key}"
        if key not in names:
            hint = get_close_matches(str(key), names, n=1)
            extra = f" (did you mean '{where}{hint[0]}'?)" if hint else ""
            raise ConfigError(f"unknown config key '{dotted}'{extra}; known: {', '.join(names)}")
        kwargs[key] = _coerce(hints[key], value, dotted)
    return cls(**kwargs)


_YAML_BOOL_WORDS = {False: ("no", "off", "false"), True: ("yes", "on", "true")}


def _yaml_bool_word(value: Any, choices: tuple[Any, ...]) -> Any:
    """YAML 1.1 reads `no`/`off` as False: `train.mixed_precision=no` must stay "no"."""
    if isinstance(value, bool):
        for word in _YAML_BOOL_WORDS[value]:
            if word in choices:
                return word
    return value


def _coerce(tp: Any, value: Any, where: str) -> Any:  # noqa: C901  (one branch per type kind)
    """Check/convert `value` to type hint `tp`; raises ConfigError naming `where`."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where=f"{where}.")  # type: ignore[arg-type]
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        for arg in arms:
            try:
                return _coerce(arg, value, where)
            except ConfigError as exc:
                if len(arms) == 1:  # `X | None`: X's own message says more ("finite number")
                    raise ConfigError(f"{exc} (or null)") from None
        raise ConfigError(f"{where}: {value!r} does not fit {_type_name(tp)}")
    if origin is Literal:
        value = _yaml_bool_word(value, get_args(tp))
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"{where}: {value!r} is not one of {choices}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = get_args(tp)
        return [_coerce(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if abs(value) >= 2**63:  # torch/numpy take these as 64-bit (seeds, thread counts)
            raise ConfigError(f"{where}: {value} does not fit in 64 bits")
        return value
    if tp is float:
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            with contextlib.suppress(OverflowError):  # an integer beyond float range
                number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        # NaN/inf would slip through every "> 0" check and poison the run much later.
        if number is None or not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {tp}")


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (for YAML/JSON)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
