"""Loading an experiment: YAML file + dotted `key=value` overrides -> a validated `Config`.

The steps, in order: read the YAML safely (`safe_load_yaml` refuses alias bombs), apply the
command-line overrides (`parse_overrides`, `ALIASES` resolved to the saved names), fill the
`compat` preset's fields the file and overrides leave unset (`COMPAT_PRESETS`), build the typed
dataclasses checking every key and value type, then `validate`. Every error is a `ConfigError`
whose message names the file (or "command line") and the dotted field.

This is the top of the package: it imports the schema and `trainer.config.validate` (which
imports the factories); nothing in the package imports it back.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from collections.abc import Sequence
from typing import Any

import yaml

from trainer.config.schema import COMPAT_PRESETS, Config, ConfigError
from trainer.config.validate import validate

MAX_YAML_NODES = 100_000  # a real config has a few hundred; aliases may not expand past this
MAX_YAML_DEPTH = 32  # a real config nests 3-4 levels; PyYAML recurses per level
MAX_CONFIG_BYTES = 1 << 20  # a real config is a few KB
_LONG_TOKEN = re.compile(r"\S{121,}")  # a value echoed in a message is cut to its first 60 chars

# Clearer names accepted beside arcface_torch's (which stay the documented, saved names).
ALIASES = {
    "eval.every_steps": "eval.verbose",
    "logging.every_steps": "logging.frequent",
    "data.path": "data.rec",
}


def _count_nodes(node: yaml.Node, limit: int) -> tuple[int, int]:
    """(nodes, depth) of a YAML graph with every alias expanded (what `str()` or a dump would
    visit), counted without recursion up to `limit` nodes."""
    count, deepest, stack = 0, 0, [(node, 1)]
    while stack:
        current, depth = stack.pop()
        count, deepest = count + 1, max(deepest, depth)
        if count > limit:
            break
        if isinstance(current, yaml.SequenceNode):
            stack.extend((child, depth + 1) for child in current.value)
        elif isinstance(current, yaml.MappingNode):
            for key, value in current.value:
                stack.extend(((key, depth + 1), (value, depth + 1)))
    return count, deepest


def clip_message(text: str, limit: int = 2000) -> str:
    """`text` with every run of more than 120 non-blank characters cut to its first 60 (a 1 MB
    value is not echoed whole) and at most `limit` characters in all."""
    text = _LONG_TOKEN.sub(lambda m: f"{m.group(0)[:60]}...({len(m.group(0))} characters)", text)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def safe_load_yaml(text: Any, src: str) -> Any:
    """`yaml.safe_load` that refuses an alias bomb: a few hundred bytes of nested anchors and
    aliases expand to billions of values when the config is printed or saved.

    Args:
        text: YAML text or an open text file.
        src: names the source in errors (a path, or "command line: 'key=value'").

    Raises:
        ConfigError: invalid YAML, or more than `MAX_YAML_NODES` values once aliases expand.
    """
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # a file stream is read (and decoded) here
        node = loader.get_single_node()
        if node is None:
            return None
        count, depth = _count_nodes(node, MAX_YAML_NODES)
        if count > MAX_YAML_NODES:
            raise ConfigError(
                f"{src}: YAML anchors/aliases expand to more than {MAX_YAML_NODES} values; "
                "write the values out instead"
            )
        if depth > MAX_YAML_DEPTH:
            raise ConfigError(f"{src}: YAML nested {depth} levels deep (limit {MAX_YAML_DEPTH})")
        return loader.construct_document(node)
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        raise ConfigError(f"{src}: YAML nested too deeply (limit {MAX_YAML_DEPTH})") from None
    except yaml.YAMLError as e:
        first = " ".join(str(e).split())  # one line: PyYAML's messages span several
        raise ConfigError(f"{src}: invalid YAML: {first}") from None
    finally:
        if loader is not None:
            loader.dispose()


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Checks/converts one YAML value to the annotated type; raises ConfigError naming `where`."""
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is tuple or typing.get_origin(tp) is tuple:  # tuple[float, float]: data.augment
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(value)
    if tp is dict or typing.get_origin(tp) is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    raise ConfigError(f"{where}: unsupported type {tp}")


def _check_keys_are_strings(raw: dict[Any, Any], prefix: str, src: str) -> None:
    """YAML allows `1:` or `true:` as keys; a config section only has named fields."""
    for key in raw:
        if not isinstance(key, str):
            raise ConfigError(
                f"{src}: key {key!r} in '{prefix.rstrip('.') or 'top level'}' is a "
                f"{type(key).__name__}; config keys are names"
            )


def _apply_aliases(raw: dict[str, Any], prefix: str, src: str) -> dict[str, Any]:
    out = dict(raw)
    for key in list(raw):
        canonical = ALIASES.get(f"{prefix}{key}")
        if canonical is None:
            continue
        name = canonical.rsplit(".", 1)[-1]
        if name in raw:
            raise ConfigError(
                f"{src}: '{prefix}{key}' and '{canonical}' are the same field: give one"
            )
        out[name] = out.pop(key)
    return out


def _build(cls: Any, raw: dict[str, Any], prefix: str, src: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: '{prefix or 'top level'}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    _check_keys_are_strings(raw, prefix, src)
    raw = _apply_aliases(raw, prefix, src)
    unknown = sorted(set(raw) - names)
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(f"{src}: unknown key '{key}' (valid here: {', '.join(sorted(names))})")
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        tp = hints[name]
        where = f"{src}: {prefix}{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.", src)
        else:
            kwargs[name] = _coerce(value, tp, where)
    return cls(**kwargs)


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any, src: str) -> None:
    dotted = ALIASES.get(dotted, dotted)  # an override of an alias replaces the file's value
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{src}: '{dotted}' goes through non-mapping '{part}'")
        node = child
    for alias, canonical in ALIASES.items():  # the file may have used the other name
        if canonical == dotted:
            node.pop(alias.rsplit(".", 1)[-1], None)
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`["optim.lr=0.05", "eval.val_targets=[lfw]"]` -> `[(dotted key, YAML-parsed value)]`.

    Raises:
        ConfigError: an override without `=`, or a value that is not valid YAML.
    """
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: override '{item}' is not of the form key=value")
        key, text = item.split("=", 1)
        value = safe_load_yaml(text, f"command line: '{item}'") if text != "" else ""
        out.append((key.strip(), value))
    return out


def load_config(path: str | None, overrides: Sequence[str] = ()) -> Config:
    """Loads a YAML experiment file, applies dotted `key=value` overrides, validates.

    Args:
        path: YAML file (None: defaults only). A file that sets no `output` writes to
            `work_dirs/<file name without .yaml>`, as arcface_torch (defaults: `work_dirs/run`).
        overrides: e.g. `["optim.lr=0.05", "data.batch_size=64"]`; values are parsed as YAML.

    Returns:
        A frozen, validated `Config`.

    Raises:
        ConfigError: missing, over 1 MiB or non-UTF-8 file, YAML syntax error, nesting deeper
            than `MAX_YAML_DEPTH`, unknown key, wrong type or bad value; one line (long values
            cut: `clip_message`) naming the file (or "command line") and the dotted field.
    """
    try:
        return _load(path, overrides)
    except ConfigError as e:  # one line, whatever value the file or command line held
        raise ConfigError(clip_message(str(e))) from None


def _load(path: str | None, overrides: Sequence[str]) -> Config:
    src = path or "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: config file not found")
        if os.path.getsize(path) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {os.path.getsize(path)} bytes; a config is a few KB")
        with open(path, "rb") as f:
            data = f.read()
        try:
            text = data.decode("utf-8-sig")  # a BOM, as some editors write, is dropped
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        raw = safe_load_yaml(text, path) or {}
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(raw, key, value, "command line")
    if overrides:
        src = f"{src} + command line"
    _apply_compat(raw, src)
    if path is not None and isinstance(raw, dict) and "output" not in raw:
        # arcface_torch's default: work_dirs/<config name> (utils/utils_config.py)
        raw["output"] = os.path.join("work_dirs", os.path.splitext(os.path.basename(path))[0])
    cfg: Config = _build(Config, raw, "", src)
    validate(cfg, src)
    return cfg


def _apply_compat(raw: dict[str, Any], src: str) -> None:
    """Fills the fields of the `compat` preset that `raw` (file + overrides) leaves unset."""
    name = raw.get("compat", "") if isinstance(raw, dict) else ""
    if name in ("", None):
        return
    if not isinstance(name, str) or name not in COMPAT_PRESETS:
        raise ConfigError(f"{src}: compat: must be one of {['', *COMPAT_PRESETS]}, got {name!r}")
    for dotted, value in COMPAT_PRESETS[name].items():
        section, key = dotted.split(".")
        node = raw.setdefault(section, {})
        if isinstance(node, dict) and key not in node:
            node[key] = value
