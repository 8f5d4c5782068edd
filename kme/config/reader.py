"""A strict, typed reader for TOML tables, and the error every bad field raises.

:class:`Table` reads one TOML table field by field. Each method checks the
value's type and range and returns it typed (``int``, ``float``, ``str``,
``Path`` or one of a closed set of strings), so what a loader builds is
type-checked like any other code. A table that fills a dataclass names it
(``root.table("gateway", GatewaySettings)``): a missing key then reads as that
field's default, so every default is written once, in the dataclass. A
default passed to a method (for defaults that depend on other fields) wins;
with neither, the key is required. :meth:`Table.close` refuses unknown keys,
so a typo never silently falls back to a default.

Every problem raises :class:`ConfigError`, whose text names the file and the
exact field (``kmstn[2].etsi014_port``); processes turn it into exit code 78
(:data:`EX_CONFIG`).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import tomllib
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, Final, TypeVar, overload

from kme.errors import ErrorCode, KmstnError

__all__ = ["EX_CONFIG", "ConfigError", "Table", "field_default", "read_toml"]

EX_CONFIG: Final = 78  # sysexits.h: configuration error

_D = TypeVar("_D")
_S = TypeVar("_S", bound=str)
_T = TypeVar("_T")


class ConfigError(KmstnError):
    """A configuration file is unreadable or invalid; names file and field."""

    def __init__(self, file: Path | str, fieldname: str, problem: str) -> None:
        self.file = str(file)
        self.field = fieldname
        self.problem = problem
        text = f"{self.file}: {fieldname}: {problem}" if fieldname else f"{self.file}: {problem}"
        super().__init__(ErrorCode.INVALID_ARGUMENT, text)

    def __str__(self) -> str:
        return self.public


class _Unset(enum.Enum):
    """No value: a key absent from the file, or a method called without a default."""

    UNSET = enum.auto()


_UNSET: Final = _Unset.UNSET


def field_default(model: type, name: str, kind: type[_T]) -> _T:
    """The default of field ``name`` of dataclass ``model``, which must be a ``kind``.

    A default of another type is a programming error (the reader would hand
    out a value of the wrong type), so it raises TypeError, not ConfigError.
    """
    value = _model_default(model, name)
    if not isinstance(value, kind):
        raise TypeError(f"{model.__name__}.{name} defaults to {value!r}, not a {kind.__name__}")
    return value


def _model_default(model: type | None, name: str) -> object:
    if model is None:
        return _UNSET
    for f in dataclasses.fields(model):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            return _UNSET
    return _UNSET


def _type_name(value: object) -> str:
    return {
        bool: "a boolean", int: "an integer", float: "a number", str: "a string",
        list: "an array", dict: "a table",
    }.get(type(value), type(value).__name__)


def read_toml(path: Path) -> dict[str, Any]:
    """The parsed file, or a ConfigError saying why it cannot be read."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(path, "", "file not found") from None
    except PermissionError:
        raise ConfigError(path, "", "permission denied") from None
    except IsADirectoryError:
        raise ConfigError(path, "", "is a directory, not a file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "", f"not valid TOML: {exc}") from None


class Table:
    """Read fields from one TOML table, remembering which were used.

    ``model`` is the dataclass this table fills, whose field defaults serve
    for missing keys; ``required`` names fields that a file must give even
    though the dataclass has a default (one kept for code that builds the
    object by hand).
    """

    def __init__(self, file: Path, data: Mapping[str, Any], where: str = "",
                 model: type | None = None, required: Collection[str] = ()) -> None:
        self.file = file
        self.data = data
        self.where = where
        self.model = model
        self.required = frozenset(required)
        self._seen: set[str] = set()

    def name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.file, self.name(key), problem)

    def field_default(self, key: str, kind: type[_T]) -> _T:
        """The model's default for ``key`` (for defaults derived from it)."""
        if self.model is None:
            raise TypeError(f"table {self.where or '<root>'} fills no dataclass")
        return field_default(self.model, key, kind)

    # -- lookup --------------------------------------------------------------------

    def _lookup(self, key: str) -> Any:
        """The raw TOML value of ``key``, or _UNSET if the table lacks it."""
        self._seen.add(key)
        return self.data.get(key, _UNSET)

    def _fallback(self, key: str, default: object) -> object:
        """What a missing key reads as: the given default, else the model's; else an error."""
        if default is _UNSET and key not in self.required:
            default = _model_default(self.model, key)
        if default is _UNSET:
            raise self.error(key, "is required")
        return default

    def _wrong_default(self, key: str, value: object, kind: str) -> TypeError:
        model = self.model.__name__ if self.model is not None else "?"
        return TypeError(f"{model}.{key} defaults to {value!r}, not {kind}; "
                         "read it with the optional_ method")

    def _string(self, key: str, value: object) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, f"must be a non-empty string, got {_type_name(value)}")
        return value

    # -- scalars -------------------------------------------------------------------

    @overload
    def text(self, key: str) -> str: ...
    @overload
    def text(self, key: str, default: _D) -> str | _D: ...

    def text(self, key: str, default: object = _UNSET) -> object:
        value = self._lookup(key)
        if value is _UNSET:
            fallback = self._fallback(key, default)
            if default is not _UNSET or isinstance(fallback, str):
                return fallback
            raise self._wrong_default(key, fallback, "a string")
        return self._string(key, value)

    @overload
    def choice(self, key: str, choices: tuple[_S, ...]) -> _S: ...
    @overload
    def choice(self, key: str, choices: tuple[_S, ...], default: _S) -> _S: ...

    def choice(self, key: str, choices: tuple[_S, ...], default: object = _UNSET) -> _S:
        """A string from a closed set; typed as the set's Literal type."""
        value = self._lookup(key)
        if value is _UNSET:
            value = self._fallback(key, default)
            for choice in choices:
                if choice == value:
                    return choice
            raise self._wrong_default(key, value, f"one of {choices}")
        value = self._string(key, value)
        for choice in choices:
            if choice == value:
                return choice
        raise self.error(key, f"must be one of {', '.join(choices)}; got {value!r}")

    def boolean(self, key: str) -> bool:
        """A true/false value; a missing key reads as the model's default."""
        value = self._lookup(key)
        if value is _UNSET:
            value = self._fallback(key, _UNSET)
        if not isinstance(value, bool):
            raise self.error(key, f"must be a boolean, got {_type_name(value)}")
        return value

    @overload
    def integer(self, key: str, *, lo: int | None = None, hi: int | None = None) -> int: ...
    @overload
    def integer(self, key: str, default: _D, *, lo: int | None = None,
                hi: int | None = None) -> int | _D: ...

    def integer(self, key: str, default: object = _UNSET, *, lo: int | None = None,
                hi: int | None = None) -> object:
        value = self._lookup(key)
        if value is _UNSET:
            fallback = self._fallback(key, default)
            if default is not _UNSET or (isinstance(fallback, int)
                                         and not isinstance(fallback, bool)):
                return fallback
            raise self._wrong_default(key, fallback, "an integer")
        return self._integer(key, value, lo, hi)

    def optional_integer(self, key: str, *, lo: int | None = None,
                         hi: int | None = None) -> int | None:
        """An integer that may be absent (the model's default must be None)."""
        value = self._lookup(key)
        if value is _UNSET:
            fallback = _model_default(self.model, key)
            if fallback is not None and fallback is not _UNSET:
                raise TypeError(f"{key} defaults to {fallback!r}; read it with integer()")
            return None
        return self._integer(key, value, lo, hi)

    def _integer(self, key: str, value: object, lo: int | None, hi: int | None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"must be an integer, got {_type_name(value)}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f"from {lo} to {hi}" if hi is not None else f"at least {lo}"
            raise self.error(key, f"must be an integer {bounds}, got {value}")
        return value

    @overload
    def number(self, key: str, *, positive: bool = True, nonnegative: bool = False
               ) -> float: ...
    @overload
    def number(self, key: str, default: _D, *, positive: bool = True,
               nonnegative: bool = False) -> float | _D: ...

    def number(self, key: str, default: object = _UNSET, *, positive: bool = True,
               nonnegative: bool = False) -> object:
        value = self._lookup(key)
        if value is _UNSET:
            fallback = self._fallback(key, default)
            if default is not _UNSET or isinstance(fallback, float):
                return fallback
            raise self._wrong_default(key, fallback, "a float")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(key, f"must be a number, got {_type_name(value)}")
        if not math.isfinite(value):
            raise self.error(key, f"must be finite, got {value}")
        if nonnegative and value < 0:
            raise self.error(key, f"must be zero or more, got {value}")
        if positive and not nonnegative and value <= 0:
            raise self.error(key, f"must be greater than 0, got {value}")
        return float(value)

    @overload
    def path(self, key: str, *, must_exist: bool = False, resolve: bool = True) -> Path: ...
    @overload
    def path(self, key: str, default: _D, *, must_exist: bool = False,
             resolve: bool = True) -> Path | _D: ...

    def path(self, key: str, default: object = _UNSET, *, must_exist: bool = False,
             resolve: bool = True) -> object:
        """A path; relative ones are relative to the file's directory (unless not
        ``resolve``: then it is taken as written, as a device node is)."""
        value = self._lookup(key)
        if value is _UNSET:
            fallback = self._fallback(key, default)
            if default is not _UNSET or isinstance(fallback, Path):
                return fallback
            raise self._wrong_default(key, fallback, "a Path")
        return self._path(key, value, must_exist, resolve)

    def optional_path(self, key: str, *, must_exist: bool = False) -> Path | None:
        """A path that may be absent (the model's default must be None)."""
        value = self._lookup(key)
        if value is _UNSET:
            fallback = _model_default(self.model, key)
            if fallback is not None and fallback is not _UNSET:
                raise TypeError(f"{key} defaults to {fallback!r}; read it with path()")
            return None
        return self._path(key, value, must_exist, True)

    def _path(self, key: str, value: object, must_exist: bool, resolve: bool) -> Path:
        text = self._string(key, value)
        if not resolve:
            return Path(text)
        path = Path(text).expanduser()
        if not path.is_absolute():
            path = (self.file.parent / path).resolve()
        if must_exist and not path.is_file():
            raise self.error(key, f"file not found: {path}")
        return path

    def strings(self, key: str) -> tuple[str, ...]:
        """A required, non-empty array of strings."""
        value = self._lookup(key)
        if value is _UNSET:
            raise self.error(key, "is required")
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise self.error(key, "must be a non-empty array of strings")
        return tuple(value)

    # -- nested tables -------------------------------------------------------------

    def table(self, key: str, model: type | None = None,
              required: Collection[str] = ()) -> Table:
        value = self._lookup(key)
        if value is _UNSET:
            value = {}
        if not isinstance(value, dict):
            raise self.error(key, f"must be a table, got {_type_name(value)}")
        return Table(self.file, value, self.name(key), model, required)

    def tables(self, key: str, model: type | None = None,
               required: Collection[str] = ()) -> list[Table]:
        value = self._lookup(key)
        if value is _UNSET:
            value = []
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.error(key, "must be an array of tables ([[" + self.name(key) + "]])")
        return [Table(self.file, v, f"{self.name(key)}[{i}]", model, required)
                for i, v in enumerate(value)]

    def close(self) -> None:
        unknown = sorted(set(self.data) - self._seen)
        if unknown:
            raise self.error(unknown[0], "unknown key")
