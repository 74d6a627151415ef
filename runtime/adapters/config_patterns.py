"""The parts of an adapter config that select modules: `rank_pattern` / `alpha_pattern` keys and a
string `target_modules` (regular expressions, run on RE2, a linear-time engine, so no pattern can
stall the server), and `layers_to_transform`."""
from __future__ import annotations

import math

import re2

from .errors import CONFIG_FILE, AdapterError, is_count

MAX_PATTERN_CHARS = 1000
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False


def compile_pattern(field: str, pattern) -> "re2._Regexp":
    """A user-supplied regular expression on RE2 (linear time); refused if RE2 cannot run it."""
    if not isinstance(pattern, str) or not pattern or len(pattern) > MAX_PATTERN_CHARS:
        raise AdapterError(f"{CONFIG_FILE}: {field} patterns must be non-empty strings of at most "
                           f"{MAX_PATTERN_CHARS} characters, got {pattern!r}", 400)
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as e:
        raise AdapterError(f"{CONFIG_FILE}: {field} pattern {pattern!r} is malformed or uses a feature "
                           f"without a linear-time match (backreferences, lookaround): {e}", 400)


def patterns(config: dict, field: str, check_value) -> list[tuple["re2._Regexp", object]]:
    r"""PEFT's rank_pattern / alpha_pattern: the first key with re.match(rf"(.*\.)?({key})$", name) wins."""
    pattern = config.get(field) or {}
    if not isinstance(pattern, dict):
        raise AdapterError(f"{CONFIG_FILE}: {field} must be an object mapping module patterns to values", 400)
    compiled = []
    for key, value in pattern.items():
        compile_pattern(field, key)  # the key alone first, so a malformed key is named as such
        check_value(field, key, value)
        compiled.append((compile_pattern(field, rf"(.*\.)?({key})"), value))
    return compiled


def pattern_value(patterns: list, module_name: str, default):
    for regex, value in patterns:
        if regex.fullmatch(module_name):  # fullmatch == re.match(...$) on names without newlines
            return value
    return default


def check_rank_value(field: str, key: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise AdapterError(f"{CONFIG_FILE}: {field}[{key!r}] must be a positive integer, got {value!r}", 400)


def check_alpha_value(field: str, key: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise AdapterError(f"{CONFIG_FILE}: {field}[{key!r}] must be a finite number, got {value!r}", 400)


def layer_filter(config: dict) -> set[int] | None:
    layers = config.get("layers_to_transform")
    if layers is None:
        return None
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if not isinstance(layers, list) or not all(is_count(i) for i in layers):
        raise AdapterError(f"{CONFIG_FILE}: layers_to_transform must be a non-negative integer or a list of them, "
                           f"got {layers!r}", 400)
    return set(layers)


def target_filter(config: dict):
    """A predicate on module names from target_modules (PEFT: a string is a regex fullmatch, a list
    matches a name or its last components), or None when every module may be adapted."""
    targets = config.get("target_modules")
    if targets is None or targets == "all-linear":
        return None
    if isinstance(targets, str):
        regex = compile_pattern("target_modules", targets)
        return lambda name: regex.fullmatch(name) is not None
    if not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
        raise AdapterError(f"{CONFIG_FILE}: target_modules must be a string (a regular expression) or a list of "
                           f"module names, got {targets!r}", 400)
    return lambda name: any(name == t or name.endswith("." + t) for t in targets)
