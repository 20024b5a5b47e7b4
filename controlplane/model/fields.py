"""Reusable typed field validators: the building blocks every kind's schema is made of.

A validator checks one value found at a field path, records problems in a `Problems`
and returns the value normalised (defaults filled in), or `INVALID`. Schemas are built
from these pieces in `kinds.py`; nothing here knows about files, lines or kinds.

Messages name the value and the rule, never the path (the caller renders the path):
``-5 is not between 0 and 1000000``, ``must be a string, got integer 8080``.
"""

from __future__ import annotations

import copy
import datetime
import difflib
import ipaddress
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

Path = tuple  # of str | int: ("spec", "rules", 0, "backendRefs", 1, "weight")


class _Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


INVALID = _Sentinel("INVALID")
MISSING = _Sentinel("MISSING")


@dataclass
class Problems:
    """Collects (path, message) pairs for one object. `namespace` feeds namespace defaults."""

    namespace: str = "default"
    items: list[tuple[Path, str]] = field(default_factory=list)

    def add(self, path: Path, message: str) -> None:
        self.items.append((path, message))

    def __len__(self) -> int:
        return len(self.items)


# ---------------------------------------------------------------- rendering helpers

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def render_path(path: Iterable[Any]) -> str:
    """("spec", "rules", 0, "weight") -> spec.rules[0].weight; odd keys -> ["app.kubernetes.io/name"]."""
    out = []
    for part in path:
        if isinstance(part, int):
            out.append(f"[{part}]")
        elif isinstance(part, str) and _IDENT.match(part):
            out.append(f".{part}" if out else part)
        else:
            out.append(f"[{json.dumps(part)}]")
    return "".join(out)


def type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "mapping"
    if isinstance(value, list):
        return "list"
    if isinstance(value, (datetime.date, datetime.datetime)):
        return "timestamp"
    if isinstance(value, bytes):
        return "binary"
    return type(value).__name__


def show(value: Any) -> str:
    """A short rendering of a scalar for messages: "text", 42, true, null."""
    if isinstance(value, str):
        return json.dumps(value if len(value) <= 80 else value[:77] + "...")
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    return type_name(value)


def describe(value: Any) -> str:
    """"integer 8080", "string \"x\"", "null", "list"."""
    name = type_name(value)
    if value is None or isinstance(value, (dict, list, bytes)):
        return name
    return f"{name} {show(value)}"


def suggest(word: str, choices: Iterable[str], cutoff: float = 0.75) -> str:
    """' (did you mean "weight"?)' or '': a case-insensitive match or a close spelling."""
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    if word.lower() in lowered:
        return f' (did you mean "{lowered[word.lower()]}"?)'
    close = difflib.get_close_matches(word, choices, n=1, cutoff=cutoff)
    return f' (did you mean "{close[0]}"?)' if close else ""


# ---------------------------------------------------------------- validators

class Field:
    """Base validator. `check` returns the normalised value or INVALID."""

    expected = "a value"

    def check(self, value: Any, path: Path, problems: Problems) -> Any:  # pragma: no cover
        raise NotImplementedError

    def _wrong_type(self, value: Any, path: Path, problems: Problems) -> Any:
        problems.add(path, f"must be {self.expected}, got {describe(value)}")
        return INVALID


class Str(Field):
    """A string; `rule` is a compiled regex with a human `rule_text`; `check_fn` may add a message."""

    expected = "a string"

    def __init__(self, *, min_len: int = 1, max_len: int | None = None, rule: re.Pattern | None = None,
                 rule_text: str = "", check_fn: Callable[[str], str | None] | None = None) -> None:
        self.min_len = min_len
        self.max_len = max_len
        self.rule = rule
        self.rule_text = rule_text
        self.check_fn = check_fn

    def check(self, value, path, problems):
        if not isinstance(value, str):
            return self._wrong_type(value, path, problems)
        if len(value) < self.min_len:
            problems.add(path, "must not be empty" if self.min_len == 1 else
                         f"{show(value)} is shorter than {self.min_len} characters")
            return INVALID
        if self.max_len is not None and len(value) > self.max_len:
            problems.add(path, f"is longer than {self.max_len} characters ({len(value)})")
            return INVALID
        if self.rule is not None and not self.rule.match(value):
            problems.add(path, f"{show(value)} is not {self.rule_text}")
            return INVALID
        if self.check_fn is not None:
            msg = self.check_fn(value)
            if msg:
                problems.add(path, msg)
                return INVALID
        return value


class Enum(Field):
    """One of a fixed set of strings (or ints); `unsupported` values get a dedicated message."""

    def __init__(self, *values: Any, unsupported: Mapping[Any, str] | None = None) -> None:
        self.values = values
        self.unsupported = dict(unsupported or {})
        self.expected = "an integer" if all(isinstance(v, int) for v in values) else "a string"

    def _listing(self) -> str:
        return ", ".join(json.dumps(v) if v == "" else str(v) for v in self.values)

    def check(self, value, path, problems):
        want_int = self.expected == "an integer"
        if want_int and (isinstance(value, bool) or not isinstance(value, int)):
            return self._wrong_type(value, path, problems)
        if not want_int and not isinstance(value, str):
            return self._wrong_type(value, path, problems)
        if value in self.values:
            return value
        if value in self.unsupported:
            problems.add(path, f"{show(value)} is not supported: {self.unsupported[value]}")
            return INVALID
        hint = suggest(value, [str(v) for v in self.values]) if isinstance(value, str) else ""
        problems.add(path, f"{show(value)} is not one of {self._listing()}{hint}")
        return INVALID


class Int(Field):
    expected = "an integer"

    def __init__(self, lo: int | None = None, hi: int | None = None, *, what: str = "") -> None:
        self.lo, self.hi, self.what = lo, hi, what

    def check(self, value, path, problems):
        if isinstance(value, bool) or not isinstance(value, int):
            return self._wrong_type(value, path, problems)
        lo, hi = self.lo, self.hi
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            if self.what:
                problems.add(path, f"{value} is not {self.what}")
            elif lo is not None and hi is not None:
                problems.add(path, f"{value} is not between {lo} and {hi}")
            elif lo is not None:
                problems.add(path, f"{value} is less than {lo}")
            else:
                problems.add(path, f"{value} is greater than {hi}")
            return INVALID
        return value


class Number(Field):
    """An integer or a finite decimal number."""

    expected = "a number"

    def __init__(self, lo: float | None = None, hi: float | None = None) -> None:
        self.lo, self.hi = lo, hi

    def check(self, value, path, problems):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return self._wrong_type(value, path, problems)
        if isinstance(value, float) and not math.isfinite(value):
            problems.add(path, f"{show(value)} is not a finite number")
            return INVALID
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            problems.add(path, f"{show(value)} is not between {self.lo:g} and {self.hi:g}")
            return INVALID
        return value


class Bool(Field):
    expected = "a boolean (true or false)"

    def check(self, value, path, problems):
        if not isinstance(value, bool):
            return self._wrong_type(value, path, problems)
        return value


class Const(Field):
    """Exactly one allowed value (e.g. `sourceIP: true`)."""

    def __init__(self, value: Any, why: str) -> None:
        self.value, self.why = value, why

    def check(self, value, path, problems):
        if value != self.value or type(value) is not type(self.value):
            problems.add(path, f"must be {show(self.value)} ({self.why}), got {describe(value)}")
            return INVALID
        return value


NOT_SUPPORTED_YET = "not supported yet"


def not_supported_yet_message(why: str) -> str:
    """The one wording for config the agents would accept but not act on (see NotSupportedYet)."""
    return f"{NOT_SUPPORTED_YET}: {why}"


class NotSupportedYet(Field):
    """A field the model knows but no agent enforces: its value is still checked (so the
    operator sees every mistake at once), then refused. A setting that is accepted and
    silently ignored is worse than a refusal, above all for security and resilience."""

    def __init__(self, inner: Field, why: str) -> None:
        self.inner, self.why = inner, why

    def check(self, value, path, problems):
        self.inner.check(value, path, problems)
        problems.add(path, not_supported_yet_message(self.why))
        return INVALID


def port_field() -> Int:
    return Int(1, 65535, what="a valid port (1-65535)")


# -- durations (Gateway API GEP-2257: 1h, 10s, 500ms, 1h30m; at most 4 parts of up to 5 digits)

_DURATION = re.compile(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$")
_DURATION_PART = re.compile(r"([0-9]{1,5})(h|ms|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_duration(text: str) -> float:
    """Seconds in a Gateway API duration ("1h30m" -> 5400.0); ValueError when malformed."""
    if not isinstance(text, str) or not _DURATION.match(text):
        raise ValueError(f"{text!r} is not a duration")
    return sum(int(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text))


def format_duration(seconds: float) -> str:
    """The shortest Gateway API spelling of a number of seconds (60 -> "1m")."""
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"


class Duration(Field):
    """A Gateway API duration string; `minimum` in seconds (0 allowed unless `positive`)."""

    expected = "a duration string (e.g. 10s, 500ms, 1h30m)"

    def __init__(self, *, positive: bool = False, minimum: float | None = None) -> None:
        self.positive, self.minimum = positive, minimum

    def check(self, value, path, problems):
        if not isinstance(value, str):
            return self._wrong_type(value, path, problems)
        try:
            seconds = parse_duration(value)
        except ValueError:
            problems.add(path, f"{show(value)} is not a duration (Gateway API format: "
                               f"up to 4 parts of <number><h|m|s|ms>, e.g. 10s, 500ms, 1h30m)")
            return INVALID
        if self.positive and seconds <= 0:
            problems.add(path, f"{show(value)} must be longer than 0s")
            return INVALID
        if self.minimum is not None and seconds < self.minimum:
            problems.add(path, f"{show(value)} is shorter than the minimum {format_duration(self.minimum)}")
            return INVALID
        return value


# -- addresses

class IPv4(Field):
    expected = "an IPv4 address string"

    def check(self, value, path, problems):
        if not isinstance(value, str):
            return self._wrong_type(value, path, problems)
        try:
            return str(ipaddress.IPv4Address(value))
        except ValueError:
            problems.add(path, f"{show(value)} is not an IPv4 address")
            return INVALID


class CIDR(Field):
    """An IPv4 network "10.0.0.0/8"; `address_ok` also accepts a bare address (as a /32)."""

    expected = "a CIDR string"

    def __init__(self, *, address_ok: bool = False, max_prefix: int = 32) -> None:
        self.address_ok, self.max_prefix = address_ok, max_prefix

    def check(self, value, path, problems):
        if not isinstance(value, str):
            return self._wrong_type(value, path, problems)
        if self.address_ok and "/" not in value:
            try:
                return str(ipaddress.IPv4Address(value))
            except ValueError:
                problems.add(path, f"{show(value)} is not an IPv4 address or CIDR")
                return INVALID
        try:
            net = ipaddress.IPv4Network(value, strict=False)
        except ValueError:
            problems.add(path, f"{show(value)} is not a valid IPv4 CIDR (like 10.0.0.0/8)")
            return INVALID
        if "/" not in value:
            problems.add(path, f"{show(value)} is not a CIDR: it needs a prefix length (like {value}/32)")
            return INVALID
        if net.network_address != ipaddress.IPv4Address(value.split("/")[0]):
            problems.add(path, f"{show(value)} has host bits set (the network is {net})")
            return INVALID
        if net.prefixlen > self.max_prefix:
            problems.add(path, f"{show(value)} is too small: the prefix must be /{self.max_prefix} or shorter")
            return INVALID
        return str(net)


def regex_problem(text: str) -> str | None:
    try:
        re.compile(text)
    except re.error as exc:
        return f"{show(text)} is not a valid regular expression: {exc}"
    return None


# ---------------------------------------------------------------- containers

@dataclass(frozen=True)
class Slot:
    """A field of an `Obj`: its validator, whether it is required, its default."""

    field: Field
    required: bool = False
    default: Any = MISSING   # a value (deep-copied) or a callable(problems) -> value
    hint: str = ""           # appended to the "required field is missing" message


def required(f: Field, hint: str = "") -> Slot:
    return Slot(f, required=True, hint=hint)


def optional(f: Field, default: Any = MISSING) -> Slot:
    return Slot(f, default=default)


Check = Callable[[dict, dict, Path, Problems], None]


class Obj(Field):
    """A mapping with known fields. Unknown fields, missing required ones and non-string keys
    are errors. `checks(out, raw, path, problems)` run afterwards for cross-field rules: `out`
    holds the valid, normalised fields (invalid ones are absent), `raw` the input as written."""

    expected = "a mapping"

    def __init__(self, fields: Mapping[str, Field | Slot], *, checks: Iterable[Check] = ()) -> None:
        self.slots = {k: (v if isinstance(v, Slot) else Slot(v)) for k, v in fields.items()}
        self.checks = tuple(checks)

    def check(self, value, path, problems):
        if not isinstance(value, dict):
            return self._wrong_type(value, path, problems)
        out: dict[str, Any] = {}
        ok = True
        slots = self.slots
        for key, item in value.items():
            slot = slots.get(key) if isinstance(key, str) else None
            if slot is None:
                ok = False
                if not isinstance(key, str):
                    problems.add(path + (key,), f"field names must be strings, got {describe(key)}")
                else:
                    hint = suggest(key, slots)
                    if hint:
                        problems.add(path + (key,), f"unknown field{hint}")
                    else:
                        problems.add(path + (key,), f"unknown field (known: {', '.join(slots) or 'none'})")
                continue
            result = slot.field.check(item, path + (key,), problems)
            if result is INVALID:
                ok = False
            else:
                out[key] = result
        for key, slot in slots.items():
            if key in value:
                continue
            if slot.required:
                problems.add(path + (key,), "required field is missing" + (f" ({slot.hint})" if slot.hint else ""))
                ok = False
            elif slot.default is not MISSING:
                d = slot.default
                out[key] = d(problems) if callable(d) else copy.deepcopy(d)
        before = len(problems)
        for fn in self.checks:
            fn(out, value, path, problems)
        if len(problems) != before:
            ok = False
        return out if ok else INVALID


class List(Field):
    """A list of items; `unique` = (subfield or None, normaliser, noun) rejects repeats."""

    expected = "a list"

    def __init__(self, item: Field, *, min_items: int = 0, max_items: int | None = None,
                 unique: tuple[str | None, Callable[[Any], Any], str] | None = None) -> None:
        self.item, self.min_items, self.max_items, self.unique = item, min_items, max_items, unique

    def check(self, value, path, problems):
        if not isinstance(value, list):
            return self._wrong_type(value, path, problems)
        if len(value) < self.min_items:
            problems.add(path, "must not be empty" if self.min_items == 1 else
                         f"needs at least {self.min_items} items, got {len(value)}")
            return INVALID
        if self.max_items is not None and len(value) > self.max_items:
            problems.add(path, f"has {len(value)} items; at most {self.max_items} are allowed")
            return INVALID
        out = []
        ok = True
        for i, item in enumerate(value):
            result = self.item.check(item, path + (i,), problems)
            if result is INVALID:
                ok = False
            out.append(result)
        if self.unique is not None:
            sub, norm, noun = self.unique
            seen: dict[Any, int] = {}
            for i, result in enumerate(out):
                if result is INVALID:
                    continue
                raw = result.get(sub) if sub is not None else result
                if raw is None:
                    continue
                key = norm(raw)
                if key in seen:
                    where = path + (i, sub) if sub is not None else path + (i,)
                    problems.add(where, f"duplicate {noun} {show(raw)} (also at {render_path(path + (seen[key],))})")
                    ok = False
                else:
                    seen[key] = i
        return out if ok else INVALID


class Map(Field):
    """A mapping of arbitrary keys (validated by `key`) to values (validated by `value`)."""

    expected = "a mapping"

    def __init__(self, key: Field, value: Field, *, max_items: int | None = None,
                 key_out: Callable[[Any], str] = str) -> None:
        self.key, self.value, self.max_items, self.key_out = key, value, max_items, key_out

    def check(self, value, path, problems):
        if not isinstance(value, dict):
            return self._wrong_type(value, path, problems)
        if self.max_items is not None and len(value) > self.max_items:
            problems.add(path, f"has {len(value)} entries; at most {self.max_items} are allowed")
            return INVALID
        out = {}
        ok = True
        for k, v in value.items():
            kp = path + (k,)
            if self.key.check(k, kp, problems) is INVALID:
                ok = False
                continue
            result = self.value.check(v, kp, problems)
            if result is INVALID:
                ok = False
            else:
                out[self.key_out(k)] = result
        return out if ok else INVALID


class Either(Field):
    """An int or a string validated by different validators (Kubernetes IntOrString)."""

    expected = "an integer or a string"

    def __init__(self, as_int: Field, as_str: Field) -> None:
        self.as_int, self.as_str = as_int, as_str

    def check(self, value, path, problems):
        if isinstance(value, int) and not isinstance(value, bool):
            return self.as_int.check(value, path, problems)
        if isinstance(value, str):
            return self.as_str.check(value, path, problems)
        return self._wrong_type(value, path, problems)


# ---------------------------------------------------------------- reusable checks for Obj

def exactly_one(*names: str, allow_none: bool = False) -> Check:
    """Exactly one of the fields (by presence as written); with allow_none, at most one."""

    def check(out, raw, path, problems):
        present = [n for n in names if n in raw]
        listing = ", ".join(names)
        if len(present) > 1:
            problems.add(path + (present[1],), f"only one of {listing} may be set (found {' and '.join(present)})")
        elif not present and not allow_none:
            problems.add(path, f"one of {listing} is required")
    return check


def at_least_one(*names: str) -> Check:
    def check(out, raw, path, problems):
        if not any(n in raw for n in names):
            problems.add(path, f"at least one of {', '.join(names)} is required")
    return check


# ---------------------------------------------------------------- Kubernetes names

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_IANA_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")

LABEL_TEXT = ("a valid DNS-1123 label (lowercase letters, digits and '-', "
              "starting and ending with a letter or digit, at most 63 characters)")
SUBDOMAIN_TEXT = ("a valid DNS-1123 subdomain (lowercase letters, digits, '-' and '.', "
                  "starting and ending with a letter or digit, at most 253 characters)")
DNS1035_TEXT = ("a valid DNS-1035 label (lowercase letters, digits and '-', "
                "starting with a letter and ending with a letter or digit, at most 63 characters)")


def dns_label() -> Str:
    return Str(max_len=63, rule=DNS1123_LABEL, rule_text=LABEL_TEXT)


def dns_subdomain() -> Str:
    return Str(max_len=253, rule=DNS1123_SUBDOMAIN, rule_text=SUBDOMAIN_TEXT)


def dns1035_label() -> Str:
    return Str(max_len=63, rule=DNS1035_LABEL, rule_text=DNS1035_TEXT)


def name_problem(value: str, rule: re.Pattern, max_len: int, text: str) -> str | None:
    if len(value) > max_len or not rule.match(value):
        return f"{show(value)} is not {text}"
    return None


def _qualified_name_problem(key: str) -> str | None:
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not DNS1123_SUBDOMAIN.match(prefix)):
        return f"{show(key)} is not a valid label key: the prefix before '/' must be a DNS-1123 subdomain"
    if not name or len(name) > 63 or not _QUALIFIED_NAME.match(name):
        return (f"{show(key)} is not a valid label key: the name must be at most 63 characters of "
                f"letters, digits, '-', '_' or '.', starting and ending with a letter or digit")
    return None


def _label_value_problem(value: str) -> str | None:
    if value == "":
        return None
    if len(value) > 63 or not _QUALIFIED_NAME.match(value):
        return (f"{show(value)} is not a valid label value: at most 63 characters of letters, digits, "
                f"'-', '_' or '.', starting and ending with a letter or digit")
    return None


def label_key() -> Str:
    return Str(check_fn=_qualified_name_problem)


def label_value() -> Str:
    return Str(min_len=0, check_fn=_label_value_problem)


def labels_map() -> Map:
    return Map(label_key(), label_value())


def _port_name_problem(value: str) -> str | None:
    if (len(value) > 15 or not _IANA_SVC_NAME.match(value) or "--" in value
            or not re.search(r"[a-z]", value)):
        return (f"{show(value)} is not a valid port name (at most 15 lowercase letters, digits and '-', "
                f"with at least one letter, no leading, trailing or double '-')")
    return None


def port_name() -> Str:
    """An IANA_SVC_NAME, as Kubernetes requires for named (container) ports."""
    return Str(check_fn=_port_name_problem)


# ---------------------------------------------------------------- HTTP tokens

_TOKEN = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$")
_HEADER_VALUE = re.compile(r"^[^\r\n\x00]*$")
_HOSTNAME = re.compile(r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_PRECISE_HOSTNAME = DNS1123_SUBDOMAIN


def header_name() -> Str:
    return Str(max_len=256, rule=_TOKEN, rule_text="a valid HTTP header name (RFC 7230 token characters)")


def header_value(max_len: int = 4096) -> Str:
    return Str(max_len=max_len, rule=_HEADER_VALUE, rule_text="a valid header value (no CR, LF or NUL)")


def hostname(wildcard: bool = True) -> Str:
    if wildcard:
        return Str(max_len=253, rule=_HOSTNAME,
                   rule_text="a valid hostname (lowercase RFC 1123, optionally prefixed by '*.'; no IPs)")
    return Str(max_len=253, rule=_PRECISE_HOSTNAME, rule_text="a valid hostname (lowercase RFC 1123)")


def token(what: str) -> Str:
    return Str(max_len=256, rule=_TOKEN, rule_text=what)
