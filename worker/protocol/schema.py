"""The payload schema language: ``Field`` types and ``check_schema``.

A schema is a dict ``{key: Field}`` (``messages.MESSAGE_TYPES`` and
``control.CONTROL_COMMANDS`` are written in it). ``check_schema`` raises
``InvalidPayload`` naming the offending key; nothing here knows a message type.
The value helpers (``is_id``, ``safe_repr``, ...) are shared by the envelope and
tensor codecs, and ``b64``/``unb64`` are the encoding of ``B64`` fields.
"""
from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass
from typing import Any, Mapping

from worker.protocol.errors import InvalidPayload
from worker.protocol.limits import ID_PATTERN, ID_RULE, MAX_ID_CHARS, MAX_JSON_INT, MAX_OBJECT_DEPTH

# A schema is a dict {key: Field}. Every key is required (null only where nullable),
# and keys not in the schema are rejected: new fields come with a new protocol_version.


def json_type(v: Any) -> str:
    """The JSON type name of a decoded value: "null", "boolean", "number", "string", "array", "object"."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(v), type(v).__name__)


def safe_repr(v: Any, n: int = 40) -> str:
    """A short, log-safe rendering of a peer's value (arrays and objects by type only)."""
    if isinstance(v, str):
        r = repr(v[:n])
    elif v is None or isinstance(v, (bool, int, float)):
        r = repr(v)
    else:
        return f"an {json_type(v)}" if json_type(v)[0] in "aeiou" else f"a {json_type(v)}"
    return r if len(r) <= n else r[: n - 3] + "..."


def is_utf8(s: str) -> bool:
    """Whether ``s`` encodes as UTF-8 (False for lone surrogates)."""
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:  # lone surrogates, which JSON escapes can carry
        return False


def is_int(v: Any) -> bool:
    """Whether ``v`` is a JSON integer (an int, not a bool)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_id(v: Any) -> bool:
    """Whether ``v`` is a valid id (``limits.ID_PATTERN``)."""
    return isinstance(v, str) and ID_PATTERN.fullmatch(v) is not None


@dataclass(frozen=True, kw_only=True)
class Field:
    """One payload key's type and limits; ``check`` raises InvalidPayload naming ``where``."""

    nullable: bool = False

    def check(self, value: Any, where: str) -> None:
        if value is None:
            if not self.nullable:
                raise InvalidPayload(f"{where} must not be null")
            return
        self._check(value, where)

    def _check(self, value: Any, where: str) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class Str(Field):
    max_len: int  # characters
    min_len: int = 1
    choices: tuple[str, ...] = ()
    prefix: str = ""

    def _check(self, value, where):
        if not isinstance(value, str):
            raise InvalidPayload(f"{where} must be a string, got {json_type(value)}")
        if not self.min_len <= len(value) <= self.max_len:
            raise InvalidPayload(f"{where} must have {self.min_len}..{self.max_len} characters, got {len(value)}")
        if not is_utf8(value):
            raise InvalidPayload(f"{where} contains a lone surrogate, which is not UTF-8")
        if self.choices and value not in self.choices:
            raise InvalidPayload(f"{where} must be one of {', '.join(self.choices)}; got {safe_repr(value)}")
        if not value.startswith(self.prefix):
            raise InvalidPayload(f"{where} must start with {self.prefix!r}")


@dataclass(frozen=True, kw_only=True)
class Id(Field):
    """An id: see ``ID_PATTERN``."""

    def _check(self, value, where):
        if not is_id(value):
            raise InvalidPayload(f"{where} must be {ID_RULE}; got {safe_repr(value)}")


@dataclass(frozen=True, kw_only=True)
class Int(Field):
    lo: int = 0
    hi: int = MAX_JSON_INT

    def _check(self, value, where):
        if not is_int(value):
            raise InvalidPayload(f"{where} must be an integer, got {json_type(value)}")
        if not self.lo <= value <= self.hi:
            raise InvalidPayload(f"{where} must be in {self.lo}..{self.hi}, got {safe_repr(value)}")


@dataclass(frozen=True, kw_only=True)
class Num(Field):
    """A finite JSON number (integer or float) in ``lo..hi``."""

    lo: float = 0.0
    hi: float = float(MAX_JSON_INT)

    def _check(self, value, where):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidPayload(f"{where} must be a number, got {json_type(value)}")
        if not self.lo <= value <= self.hi:
            raise InvalidPayload(f"{where} must be in {self.lo:g}..{self.hi:g}, got {safe_repr(value)}")


@dataclass(frozen=True, kw_only=True)
class Bool(Field):
    def _check(self, value, where):
        if not isinstance(value, bool):
            raise InvalidPayload(f"{where} must be true or false, got {json_type(value)}")


@dataclass(frozen=True, kw_only=True)
class B64(Field):
    """Standard base64 (RFC 4648 §4, with padding) of ``min_bytes..max_bytes`` bytes."""

    min_bytes: int = 1
    max_bytes: int = 1024

    def _check(self, value, where):
        if not isinstance(value, str):
            raise InvalidPayload(f"{where} must be a base64 string, got {json_type(value)}")
        if len(value) > 4 * ((self.max_bytes + 2) // 3):
            raise InvalidPayload(f"{where} is longer than base64 of {self.max_bytes} bytes")
        try:
            raw = base64.b64decode(value.encode("ascii"), validate=True)
        except (UnicodeEncodeError, binascii.Error):
            raise InvalidPayload(f"{where} is not valid base64 (RFC 4648 alphabet with padding)") from None
        if not self.min_bytes <= len(raw) <= self.max_bytes:
            want = self.min_bytes if self.min_bytes == self.max_bytes else f"{self.min_bytes}..{self.max_bytes}"
            raise InvalidPayload(f"{where} must decode to {want} bytes, got {len(raw)}")


@dataclass(frozen=True, kw_only=True)
class IntList(Field):
    max_items: int
    min_items: int = 1
    lo: int = 0
    hi: int = MAX_JSON_INT

    def _check(self, value, where):
        if not isinstance(value, list):
            raise InvalidPayload(f"{where} must be an array of integers, got {json_type(value)}")
        if not self.min_items <= len(value) <= self.max_items:
            raise InvalidPayload(f"{where} must have {self.min_items}..{self.max_items} items, got {len(value)}")
        for i, v in enumerate(value):
            if not is_int(v) or not self.lo <= v <= self.hi:
                raise InvalidPayload(f"{where}[{i}] must be an integer in {self.lo}..{self.hi}, got {safe_repr(v)}")


@dataclass(frozen=True, kw_only=True)
class FlatObject(Field):
    """An object of up to ``max_keys`` scalar values: string (≤ 256 chars), number, boolean or null."""

    max_keys: int = 64

    def _check(self, value, where):
        if not isinstance(value, dict):
            raise InvalidPayload(f"{where} must be an object, got {json_type(value)}")
        if len(value) > self.max_keys:
            raise InvalidPayload(f"{where} has {len(value)} keys; the limit is {self.max_keys}")
        for k, v in value.items():
            if not isinstance(k, str) or not 1 <= len(k) <= MAX_ID_CHARS or not is_utf8(k):
                raise InvalidPayload(f"{where} key {safe_repr(k)} must be 1..{MAX_ID_CHARS} UTF-8 characters")
            ok = (v is None or isinstance(v, bool) or (isinstance(v, float) and math.isfinite(v))
                  or (is_int(v) and abs(v) <= MAX_JSON_INT)
                  or (isinstance(v, str) and len(v) <= 256 and is_utf8(v)))
            if not ok:
                raise InvalidPayload(f"{where}.{k} must be a string (≤ 256 chars), number (|n| < 2^53), boolean or null")


@dataclass(frozen=True, kw_only=True)
class JsonObject(Field):
    """A free-form JSON object nested at most ``max_depth`` levels: objects with string
    keys, arrays, UTF-8 strings, finite numbers, booleans, null."""

    max_depth: int = MAX_OBJECT_DEPTH

    def _check(self, value, where):
        if not isinstance(value, dict):
            raise InvalidPayload(f"{where} must be an object, got {json_type(value)}")
        stack = [(value, 1)]
        while stack:
            v, depth = stack.pop()
            if depth > self.max_depth:
                raise InvalidPayload(f"{where} is nested deeper than {self.max_depth} levels")
            if isinstance(v, dict) and not all(isinstance(k, str) and is_utf8(k) for k in v):
                raise InvalidPayload(f"{where} has an object key that is not a UTF-8 string")
            for x in v.values() if isinstance(v, dict) else v:
                if isinstance(x, (dict, list)):
                    stack.append((x, depth + 1))
                elif not (x is None or isinstance(x, (bool, int)) or (isinstance(x, float) and math.isfinite(x))
                          or (isinstance(x, str) and is_utf8(x))):
                    raise InvalidPayload(f"{where} holds {safe_repr(x)}, which is not a JSON value (or a lone surrogate)")


@dataclass(frozen=True, kw_only=True)
class Record(Field):
    """A nested object with its own schema (same rules as a payload)."""

    fields: Mapping[str, Field]

    def _check(self, value, where):
        check_schema(self.fields, value, where)


@dataclass(frozen=True, kw_only=True)
class RecordList(Field):
    """An array of ``min_items..max_items`` objects, each with the schema ``fields``."""

    fields: Mapping[str, Field]
    max_items: int
    min_items: int = 0

    def _check(self, value, where):
        if not isinstance(value, list):
            raise InvalidPayload(f"{where} must be an array of objects, got {json_type(value)}")
        if not self.min_items <= len(value) <= self.max_items:
            raise InvalidPayload(f"{where} must have {self.min_items}..{self.max_items} items, got {len(value)}")
        for i, v in enumerate(value):
            check_schema(self.fields, v, f"{where}[{i}]")


def check_schema(schema: Mapping[str, Field], obj: Any, where: str = "payload") -> None:
    """Raise InvalidPayload unless ``obj`` is an object with exactly ``schema``'s keys, each valid."""
    if not isinstance(obj, dict):
        raise InvalidPayload(f"{where} must be an object, got {json_type(obj)}")
    unknown = sorted(k for k in obj if k not in schema)
    if unknown:
        raise InvalidPayload(f"{where} has unknown field(s) {', '.join(safe_repr(k, 30) for k in unknown[:5])}")
    for key, f in schema.items():
        if key not in obj:
            raise InvalidPayload(f"{where}.{key} is missing")
        f.check(obj[key], f"{where}.{key}")


def b64(data: bytes) -> str:
    """Standard base64 with padding (RFC 4648 §4), the encoding of B64 fields."""
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    """Bytes of a B64 field that already passed validation (ValueError otherwise)."""
    return base64.b64decode(text.encode("ascii"), validate=True)


__all__ = [
    "B64", "Bool", "Field", "FlatObject", "Id", "Int", "IntList", "JsonObject", "Num", "Record", "RecordList", "Str",
    "b64", "check_schema", "is_id", "is_int", "is_utf8", "json_type", "safe_repr", "unb64",
]
