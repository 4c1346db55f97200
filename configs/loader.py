"""YAML file + dotted CLI overrides -> ``JobConfig``, with strict key and type checking.

    cfg = load_config("configs/tiny.yaml", ["--optim.lr=3e-4", "--model.n_layers=2"])

Override values follow YAML scalar rules (``2`` is an int, ``true`` a bool, ``[0.9, 0.95]`` a list); floats
also accept YAML-1.1 strings such as ``3e-4``. Unknown sections/keys and wrong types raise ``ValueError``
naming the key, the section, where it came from and the closest valid keys.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, Sequence

import yaml

from configs.config import SECTIONS, JobConfig


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> JobConfig:
    """Read ``path`` (None: all defaults), apply ``overrides`` (``--section.key=value``), validate."""
    source = str(path) if path is not None else "<defaults>"
    raw = read_yaml(path) if path is not None else {}
    for item in overrides:
        section, key, value = parse_override(item)
        raw.setdefault(section, {})[key] = value
    if overrides:
        source += " + overrides " + " ".join(overrides)
    return build_config(raw, source)


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The file's sections; ``base: other.yaml`` (relative to this file) starts from that file's sections, which
    this one's keys then override one by one (e.g. a training stage that changes only the sequence length)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist (see configs/*.yaml for examples)")
    if path.resolve() in _seen:
        raise ValueError(f"config file {path}: base files form a cycle ({' -> '.join(str(p) for p in _seen)})")
    raw = _read_one(path)
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str) or not base:
        raise ValueError(f"config file {path}: base must be the path of another config file, got {base!r}")
    merged = read_yaml(path.parent / base, (*_seen, path.resolve()))
    for section, values in raw.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged


def _read_one(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"config file {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from e
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"config file {path}: top level must be a mapping of sections "
                         f"({', '.join(SECTIONS)}), got {type(raw).__name__}")
    return raw


def parse_override(item: str) -> tuple[str, str, Any]:
    """``--optim.lr=3e-4`` -> ("optim", "lr", "3e-4"); the value is parsed as a YAML scalar."""
    text = item[2:] if item.startswith("--") else item
    dotted, sep, value_text = text.partition("=")
    parts = dotted.split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ValueError(f"bad override {item!r}: expected --section.key=value, e.g. --optim.lr=3e-4")
    section, key = parts
    _check_key(section, key, f"override {item!r}")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError as e:
        raise ValueError(f"bad override {item!r}: value is not a YAML scalar: {e}") from e
    return section, key, value


def build_config(raw: dict[str, Any], source: str = "<dict>") -> JobConfig:
    sections: dict[str, Any] = {}
    for section, values in raw.items():
        _check_section(section, source)
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ValueError(f"section {section!r} in {source} must be a mapping of keys, got {values!r}")
        sections[section] = _build_section(section, values, source)
    try:
        return JobConfig(**sections)
    except ValueError as e:
        raise ValueError(f"{e} (config: {source})") from None


def _build_section(section: str, values: dict[str, Any], source: str) -> Any:
    _check_section(section, source)
    return _build_dataclass(SECTIONS[section], values, section, source)


def _build_dataclass(cls: type, values: dict[str, Any], where: str, source: str) -> Any:
    """``cls(**values)`` with every key checked against the fields and every value against its annotation."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        _check_field(cls, str(key), where, source)
        kwargs[key] = coerce(value, hints[key], f"{where}.{key}", source)
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ValueError(f"{where}: {e} (config: {source})" if "[" in where else f"{e} (config: {source})") from None


def _check_section(section: str, source: str) -> None:
    if section not in SECTIONS:
        raise ValueError(f"unknown section {section!r} in {source}.{_suggest(section, SECTIONS)} "
                         f"Valid sections: {', '.join(SECTIONS)}")


def _check_key(section: str, key: str, source: str) -> None:
    _check_section(section, source)
    _check_field(SECTIONS[section], key, section, source)


def _check_field(cls: type, key: str, where: str, source: str) -> None:
    names = [f.name for f in dataclasses.fields(cls)]
    if key not in names:
        kind = f"section {where!r}" if "." not in where and "[" not in where else f"{where!r}"
        raise ValueError(f"unknown key {key!r} in {kind} ({source}).{_suggest(key, names)} "
                         f"Valid keys in {where!r}: {', '.join(names)}")


def _suggest(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=3, cutoff=0.5)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def coerce(value: Any, tp: Any, where: str, source: str = "<dict>") -> Any:
    """Check ``value`` against the annotation ``tp`` (bool, int, float, str, tuple[...], list[...])."""
    def fail(expected: str) -> ValueError:
        return ValueError(f"{where}: expected {expected}, got {value!r} ({type(value).__name__}) in {source}")

    if tp is bool:
        if not isinstance(value, bool):
            raise fail("a boolean (true/false)")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("an integer")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise fail("a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 3e-4 as a string
            except ValueError:
                pass
        raise fail("a number")
    if tp is str:
        if not isinstance(value, str):
            raise fail("a string (quote it)")
        return value
    if typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
        cls = typing.get_args(tp)[0]
        if not isinstance(value, (list, tuple)):
            raise fail("a list of mappings, e.g. [{path: /data/web, weight: 0.7}]")
        items = []
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise ValueError(f"{where}[{i}]: expected a mapping such as {{path: ..., weight: ...}}, got "
                                 f"{item!r} in {source}")
            items.append(_build_dataclass(cls, item, f"{where}[{i}]", source))
        return items
    if typing.get_origin(tp) is list:
        if not isinstance(value, (list, tuple)):
            raise fail("a list, e.g. [3, 4]")
        return [coerce(v, typing.get_args(tp)[0], f"{where}[{i}]", source) for i, v in enumerate(value)]
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise fail(f"a list of {len(args)} values")
        return tuple(coerce(v, a, f"{where}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
    raise TypeError(f"{where}: unsupported config field type {tp!r}")


def config_to_dict(cfg: JobConfig) -> dict[str, dict[str, Any]]:
    """Plain nested dict (tuples as lists) that ``build_config`` accepts back."""
    def plain(v: Any) -> Any:  # asdict already turned nested dataclasses into dicts
        return list(v) if isinstance(v, tuple) else v

    return {name: {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, name)).items()} for name in SECTIONS}


def dump_config(cfg: JobConfig, header: str = "") -> str:
    """YAML text of the resolved config (loadable with ``load_config``); ``header`` becomes # comments."""
    comments = "".join(f"# {line}\n" for line in header.splitlines())
    return comments + yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
