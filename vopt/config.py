"""Config dataclasses: validated fields, help text, JSON round-trip, versions.

Every vopt config is a dataclass deriving from :class:`VoptConfig`:

* each field carries its help text in ``field(metadata={"help": ...})`` (the
  CLI builds flags and ``--help`` from it, and a test checks none is missing);
* options are ``(str, Enum)`` classes, and plain strings are coerced to them;
* ``__post_init__`` coerces and validates fields (``validate()`` is the hook
  for per-class checks) and raises :class:`~vopt.errors.ConfigError` naming the
  field and the accepted values;
* ``to_dict``/``from_dict`` round-trip through JSON; unknown keys are an error
  that lists the valid ones; only registered config classes are instantiated;
  a different ``version`` logs a warning.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import logging
import types
import typing
from typing import Any, ClassVar

from .errors import ConfigError, UnknownNameError

log = logging.getLogger(__name__)

_CONFIG_CLASSES: dict = {}


def register_config(cls):
    """Class decorator: allow ``cls`` to be instantiated by :func:`config_from_dict`."""
    _CONFIG_CLASSES[cls.__name__] = cls
    return cls


def config_field(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING, **meta):
    """A dataclass field with mandatory help text."""
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={"help": help, **meta})
    return dataclasses.field(default=default, metadata={"help": help, **meta})


@dataclasses.dataclass
class VoptConfig:
    """Base of all vopt configs."""

    #: Bumped when a field changes meaning; stored in every serialized config.
    VERSION: ClassVar[int] = 1

    version: int = config_field(1, help="Config schema version this instance was written with.")

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(type(self).__name__, f.name, hints.get(f.name), getattr(self, f.name)))
        if self.version != self.VERSION:
            log.warning(
                "%s was written with version %s; this vopt reads version %s (fields may have changed meaning)",
                type(self).__name__, self.version, self.VERSION,
            )
        self.validate()

    def validate(self) -> None:
        """Per-class checks; raise :class:`ConfigError` naming the field."""

    # ---- serialization -------------------------------------------------
    def to_dict(self) -> dict:
        out: dict = {"type": type(self).__name__}
        for f in dataclasses.fields(self):
            out[f.name] = _to_jsonable(getattr(self, f.name))
        return out

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_dict(cls, data: dict) -> "VoptConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__}.from_dict expects a dict, got {type(data).__name__}")
        data = dict(data)
        typ = data.pop("type", cls.__name__)
        if typ != cls.__name__:
            raise ConfigError(f"config of type {typ!r} given where {cls.__name__!r} is expected")
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} for {cls.__name__}; valid keys: {sorted(valid)}")
        hints = typing.get_type_hints(cls)
        kwargs = {k: _from_jsonable(hints.get(k), v) for k, v in data.items()}
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> "VoptConfig":
        return cls.from_dict(json.loads(text))

    @classmethod
    def field_help(cls) -> dict:
        """``{field name: help text}``."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def config_from_dict(data: dict) -> VoptConfig:
    """Instantiate the registered config class named by ``data["type"]``."""
    if not isinstance(data, dict) or "type" not in data:
        raise ConfigError("a serialized config must be a dict with a 'type' key")
    cls = _CONFIG_CLASSES.get(data["type"])
    if cls is None:
        raise UnknownNameError("config type", data["type"], _CONFIG_CLASSES)
    return cls.from_dict(data)


# ---- coercion helpers -----------------------------------------------------
def _strip_optional(tp):
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else tp), True
    return tp, False


def _coerce(owner: str, name: str, tp, value):
    """Coerce ``value`` to the annotated type where that is unambiguous, else raise."""
    if tp is None:
        return value
    tp, optional = _strip_optional(tp)
    where = f"{owner}.{name}"
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where} must not be None")
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and issubclass(tp, VoptConfig):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return tp.from_dict(value)
        raise ConfigError(f"{where} must be a {tp.__name__} or dict, got {type(value).__name__}")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        try:
            return tp(value.lower() if isinstance(value, str) else value)
        except ValueError:
            raise ConfigError(f"{where}={value!r} is invalid; accepted: {[m.value for m in tp]}") from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where} must be a string, got {value!r}")
    if origin in (tuple, list):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (None,)
        items = [_coerce(owner, f"{name}[{i}]", item_tp, v) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    return value


def _to_jsonable(value):
    if isinstance(value, VoptConfig):
        return value.to_dict()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_jsonable(v) for k, v in value.items()}
    return value


def _from_jsonable(tp, value):
    if isinstance(value, dict) and "type" in value:
        return config_from_dict(value)
    if isinstance(value, dict):
        return {k: (config_from_dict(v) if isinstance(v, dict) and "type" in v else v) for k, v in value.items()}
    return value
