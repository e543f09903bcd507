"""Settings tables: the one way a kvplane process declares its settings.

A table is a frozen dataclass whose fields are declared with :func:`key`: type (the field's
annotation and a :class:`Kind` that parses it), default, constraints (range, choices, a
secret to mask), whether it may change at runtime, aliases, command-line flags and one line
of help. :func:`key_table` reads the fields back as :class:`KeySpec` rows, in declaration
order; everything else derives from those rows: validation (:func:`validate_fields`, called
by each table's ``__post_init__``, so no instance holds an unchecked value), YAML loading
(:func:`read_yaml`, :func:`check_known`), ``--help`` text (:func:`help_lines`,
:func:`add_flags`) and the generated ``docs/configuration.md``.

The tables: the engine's :class:`kvplane.config.EngineConfig` and the controller's
:class:`kvplane.controller.settings.ControllerConfig`. Pure: no torch, no sockets; the only
I/O is reading a YAML file.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from kvplane.errors import ConfigError

__all__ = [
    "BOOL",
    "FLOAT",
    "INT",
    "INT_LIST",
    "LOG_LEVEL",
    "LOG_LEVELS",
    "OPT_INT",
    "OPT_STR",
    "STR",
    "STR_LIST",
    "KeySpec",
    "Kind",
    "add_flags",
    "check_known",
    "flag_values",
    "help_lines",
    "key",
    "key_table",
    "read_yaml",
    "validate_fields",
]


class Kind(NamedTuple):
    """How one key's value is parsed, from YAML/JSON values and from strings (environment,
    command line); ``parse`` raises ValueError saying what it expected."""

    name: str
    parse: Callable[[Any], Any]


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(v, str) and v.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected a boolean (true/false)")


def _int(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError("expected an integer")
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and v.strip().lstrip("+-").isdigit():
        return int(v.strip())
    raise ValueError("expected an integer")


def _float(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError("expected a number")
    number: float | None = None
    if isinstance(v, (int, float)):
        number = float(v)
    elif isinstance(v, str):
        with contextlib.suppress(ValueError):
            number = float(v.strip())
    # NaN passes every range check and inf overflows every size computed from it.
    if number is None or not math.isfinite(number):
        raise ValueError("expected a finite number")
    return number


def _str(v: Any) -> str:
    if isinstance(v, str):
        return v
    raise ValueError("expected a string")


def _optional(inner: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def parse(v: Any) -> Any:
        if v is None or (isinstance(v, str) and v.strip().lower() in ("", "none", "null")):
            return None
        return inner(v)

    return parse


def _int_list(v: Any) -> tuple[int, ...]:
    """An int, a list of ints, or a comma-separated string (env form), as a tuple: a
    table's values never change in place."""
    if isinstance(v, str):
        text = v.strip().strip("[]")
        return tuple(_int(p) for p in text.split(",") if p.strip())
    if isinstance(v, (list, tuple)):
        return tuple(_int(p) for p in v)
    return (_int(v),)


def _str_list(v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        return tuple(p.strip() for p in v.split(",") if p.strip())
    if isinstance(v, (list, tuple)) and all(isinstance(p, str) for p in v):
        return tuple(v)
    raise ValueError("expected a list of strings")


def _log_level(v: Any) -> str:
    return _str(v).strip().upper()


BOOL = Kind("bool", _bool)
INT = Kind("int", _int)
FLOAT = Kind("float", _float)
STR = Kind("str", _str)
OPT_STR = Kind("str | null", _optional(_str))
OPT_INT = Kind("int | null", _optional(_int))
INT_LIST = Kind("int | list[int] | null", _optional(_int_list))
STR_LIST = Kind("list[str]", _str_list)
#: A logging level name in any case, kept upper case (use with ``choices=LOG_LEVELS``).
LOG_LEVEL = Kind("str", _log_level)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def key(
    default: Any,
    help: str,
    *,
    kind: Kind,
    mutable: bool = False,
    secret: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
    choices: tuple[str, ...] | None = None,
    aliases: tuple[str, ...] = (),
    flags: tuple[str, ...] = (),
) -> Any:
    """Declare one key of a table: a dataclass field carrying its :class:`KeySpec` data.

    ``mutable``: may change at runtime (the engine's ``POST /conf``); ``secret``: masked
    wherever the table is shown and never echoed in errors; ``minimum``/``maximum``: bounds
    of a number (of each number of a list); ``aliases``: other names the key loads under;
    ``flags``: command-line options that set it (:func:`add_flags`). ``default`` must be
    immutable (a tuple, not a list): an instance's values never change in place."""
    if isinstance(default, (list, dict, set)):
        raise TypeError(f"a key's default must be immutable, got {default!r}")
    spec = {
        "help": help,
        "kind": kind,
        "mutable": mutable,
        "secret": secret,
        "minimum": minimum,
        "maximum": maximum,
        "choices": choices,
        "aliases": aliases,
        "flags": flags,
    }
    return field(default=default, metadata=spec)


@dataclass(frozen=True)
class KeySpec:
    """One row of a table (see :func:`key` for the fields)."""

    name: str
    default: Any
    help: str
    kind: Kind
    mutable: bool
    secret: bool
    minimum: float | None
    maximum: float | None
    choices: tuple[str, ...] | None
    aliases: tuple[str, ...]
    flags: tuple[str, ...]

    def validate(self, raw: Any) -> Any:
        """Parse and range-check ``raw``; ConfigError names the key, the value and the rule."""
        shown = "***" if self.secret else repr(raw)  # errors reach logs and HTTP bodies
        try:
            value = self.kind.parse(raw)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{self.name}: invalid value {shown}: {exc}") from None
        numbers = value if isinstance(value, tuple) else (value,)
        for v in numbers:
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                if self.minimum is not None and v < self.minimum:
                    raise ConfigError(f"{self.name}: {shown} is below the minimum {self.minimum}")
                if self.maximum is not None and v > self.maximum:
                    raise ConfigError(f"{self.name}: {shown} is above the maximum {self.maximum}")
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"{self.name}: {shown} is not one of {list(self.choices)}")
        return value


_TABLES: dict[type, tuple[KeySpec, ...]] = {}


def key_table(table: type) -> tuple[KeySpec, ...]:
    """The rows of ``table`` (a dataclass declared with :func:`key`), in declaration order."""
    rows = _TABLES.get(table)
    if rows is None:  # a table is a class: its rows never change once read
        rows = tuple(
            KeySpec(name=f.name, default=f.default, **f.metadata)
            for f in dataclasses.fields(table)
            if f.metadata
        )
        _TABLES[table] = rows
    return rows


def validate_fields(instance: Any) -> None:
    """Validate every key of a table instance in declaration order, keeping the parsed
    value (``"64"`` becomes ``64``, a list a tuple). For a table's ``__post_init__``, so that
    building one directly validates as loading does. Raises ConfigError naming the first bad
    key."""
    for spec in key_table(type(instance)):
        value = spec.validate(getattr(instance, spec.name))
        # a frozen dataclass's own __init__ sets its fields the same way
        object.__setattr__(instance, spec.name, value)


def by_name(table: Iterable[KeySpec]) -> dict[str, KeySpec]:
    """Each row under its name and its aliases."""
    out: dict[str, KeySpec] = {}
    for spec in table:
        for name in (spec.name, *spec.aliases):
            out[name] = spec
    return out


def check_known(raw: Mapping[str, Any], table: Sequence[KeySpec], *, what: str, hint: str) -> None:
    """Raise ConfigError naming the first unknown key of ``raw`` (never its value: a
    misspelt secret key still holds a secret), the nearest valid name, and ``hint``."""
    names = by_name(table)
    unknown = sorted(k for k in raw if k not in names)
    if not unknown:
        return
    close = difflib.get_close_matches(unknown[0], list(names), n=1)
    raise ConfigError(
        f"unknown {what} key {unknown[0]!r}"
        + (f" (and {unknown[1:]})" if len(unknown) > 1 else "")
        + (f"; did you mean {close[0]!r}?" if close else "")
        + f"; {hint}"
    )


def read_yaml(path: str | Path, what: str) -> dict[str, Any]:
    """The mapping in YAML file ``path`` (empty file: ``{}``); ConfigError naming ``what``
    and the path when it cannot be read, is not YAML or holds something else."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {str(path)!r}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {str(path)!r} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {str(path)!r} must hold a mapping of keys to values")
    return {str(k): v for k, v in data.items()}


def help_lines(table: Iterable[KeySpec]) -> list[str]:
    """One ``name (kind, default): help`` line per key, for --help epilogs."""
    return [
        f"{s.name} ({s.kind.name}, default {s.default!r}{', mutable' if s.mutable else ''}): {s.help}"
        for s in table
    ]


def _shown(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _flag_type(spec: KeySpec) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return spec.validate(text)
        except ConfigError as exc:  # argparse: "argument --flag: <message>", exit code 2
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = spec.kind.name
    return parse


def add_flags(parser: argparse.ArgumentParser, table: Iterable[KeySpec]) -> None:
    """One option per key that has ``flags``, its help and default from the row; the value
    is checked by the key's own rules, so a bad one is a usage error naming the flag. A
    boolean's flag alone means true (``--flag false`` also works). An option not given is
    None in the namespace (see :func:`flag_values`)."""
    for spec in table:
        if not spec.flags:
            continue
        notes = [f"default {_shown(spec.default)}"]
        if spec.choices:
            notes.append("one of " + ", ".join(spec.choices))
        help_text = f"{spec.help.rstrip('.')} ({'; '.join(notes)})".replace("%", "%%")
        switch: dict[str, Any] = {"nargs": "?", "const": True} if spec.kind is BOOL else {}
        parser.add_argument(
            *spec.flags,
            dest=spec.name,
            type=_flag_type(spec),
            default=None,
            help=help_text,
            **switch,
        )


def flag_values(args: argparse.Namespace, table: Iterable[KeySpec]) -> dict[str, Any]:
    """The keys set on the command line (options added by :func:`add_flags`)."""
    return {
        s.name: getattr(args, s.name)
        for s in table
        if s.flags and getattr(args, s.name, None) is not None
    }
