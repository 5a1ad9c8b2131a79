"""The configuration layer both programs use: typed, nested sections (dataclasses), YAML files with
`base:` chaining, one override syntax (`key=value`), and one error that names the full key.

A program declares its schema as a dataclass of sections. A section is either a plain dataclass whose
fields carry their help text (`option(...)`), or `section(...)`: the named fields of another class or
function (megatron's `OptimizerConfig`, the model's `QwenImageConfig`, `BucketedLoader`), with their
types and defaults taken from there, so each key is declared once, where it is used.

    cfg = load(TrainConfig, "configs/smoke_tp2.yaml", ["optimizer.lr=3e-4", "model.num_layers=4"])

Loading: each YAML file of the `base:` chain (a path or a list of paths, relative to the file; later
files win, mappings merge key by key), then the overrides, then values set from command-line flags,
are applied key by key to an OmegaConf structured config of the schema; `${...}` interpolations are
resolved at the end. Every unknown key (with a "did you mean"), wrong type, or value outside a field's
`choices` raises `ConfigError` naming the full key and where it was set; range and cross-field checks
are each program's `validate`.

YAML is read as YAML 1.2 reads numbers: `3e-4` is a float and `1:8` stays the string "1:8" (PyYAML's
YAML 1.1 rules make them a string and the base-60 integer 68).
"""
from __future__ import annotations

import collections.abc
import importlib
import dataclasses
import difflib
import inspect
import os
import re
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, make_dataclass
from typing import Any, Iterator, Literal, Union, get_args, get_origin

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration value is invalid. `key` is the full dotted key; the message starts with it."""

    def __init__(self, key: str, message: str, source: str | None = None):
        self.key, self.message, self.source = key, message, source
        super().__init__(f"config key '{key}'{f' (set {source})' if source else ''}: {message}")


# --------------------------------------------------------------------------------------------------
# Declaring sections
# --------------------------------------------------------------------------------------------------
def option(default: Any, help: str, choices: tuple | None = None):
    """A field of a config section: its default, one line of help, and optionally the allowed values."""
    meta = {"help": help, **({"choices": tuple(choices)} if choices else {})}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: yaml_load(yaml.safe_dump(default)), metadata=meta)  # a deep copy
    return field(default=default, metadata=meta)


def section(name: str, source, keys: dict[str, str], defaults: dict | None = None, choices: dict | None = None,
            doc: str = ""):
    """A config section whose keys are fields of the dataclass `source`, or keyword arguments of the
    callable `source`, with their types and defaults from there (`defaults` replaces some); `keys` maps
    each name to its help text. A `Literal[...]` type becomes `str` with those choices (`choices` adds
    some for plain types); a tuple or sequence type becomes a list. `build_kwargs()` on the section gives
    its values as keyword arguments for `source`."""
    defaults, choices = defaults or {}, choices or {}
    if is_dataclass(source):
        hints = typing.get_type_hints(source)
        declared = {f.name: f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else MISSING) for f in fields(source)}
        origin = source.__name__
    else:
        hints = typing.get_type_hints(source)
        declared = {p.name: p.default if p.default is not inspect.Parameter.empty else MISSING
                    for p in inspect.signature(source).parameters.values()}
        origin = getattr(source, "__qualname__", str(source)).replace(".__init__", "")
    spec = []
    for key, help_text in keys.items():
        if key not in declared:
            raise TypeError(f"section {name}: {origin} has no field or argument {key!r}")
        typ, allowed = _config_type(hints.get(key, Any))
        allowed = tuple(choices[key]) if key in choices else allowed
        meta = {"help": help_text, "from": origin, **({"choices": allowed} if allowed else {})}
        default = defaults.get(key, declared[key])
        if default is MISSING:
            raise TypeError(f"section {name}: {origin}.{key} has no default; give one in `defaults`")
        if isinstance(default, (list, tuple, dict)):
            plain = yaml_load(yaml.safe_dump(_plain(default)))  # tuples -> lists, and a copy per instance
            spec.append((key, typ, field(default_factory=lambda d=plain: yaml_load(yaml.safe_dump(d)), metadata=meta)))
        else:
            spec.append((key, typ, field(default=default, metadata=meta)))
    cls = make_dataclass(name, spec, namespace={"build_kwargs": lambda self: dataclasses.asdict(self)})
    cls.__doc__ = doc or f"Keys of {origin}."
    return cls


def _config_type(t):
    """The type OmegaConf checks for `t`, and the choices of a Literal (or None)."""
    origin, args = get_origin(t), get_args(t)
    if origin is Literal:
        return type(args[0]), args
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            typ, choices = _config_type(inner[0])
            return typing.Optional[typ], (choices + (None,) if choices else None)
        return t, None
    if origin in (tuple, list, collections.abc.Sequence):
        item = _config_type(args[0])[0] if args else Any
        return list[item], None
    return t, None


def _plain(v):
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


# --------------------------------------------------------------------------------------------------
# YAML
# --------------------------------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """YAML 1.2 numbers: no base-60 integers (`1:8` stays a string), and `3e-4` is a float."""


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0x[0-9a-fA-F_]+|[-+]?(?:0|[1-9][0-9_]*))$"),
    list("-+0123456789"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
               r"|\.[0-9_]+(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def yaml_load(text):
    return yaml.load(text, Loader=_Loader)


def read_yaml(path: str, _seen: tuple = ()) -> list[tuple[str, dict]]:
    """The file and its `base:` chain as [(path, mapping)], bases first."""
    path = os.path.abspath(path)
    shown = os.path.relpath(path) if not os.path.relpath(path).startswith("..") else path
    if path in _seen:
        raise ConfigError("base", f"{shown} includes itself", f"in {_seen[-1]}")
    if not os.path.isfile(path):
        raise ConfigError("config", f"file not found: {shown}", f"as a base in {_seen[-1]}" if _seen else None)
    try:
        with open(path) as f:
            data = yaml_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{shown}:{mark.line + 1}:{mark.column + 1}" if mark else shown
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError("config", f"YAML syntax error at {where}: {problem}") from None
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError("config", f"{shown} must hold a mapping, not {type(data).__name__}")
    bases = data.pop("base", None) or []
    layers = []
    for base in [bases] if isinstance(bases, str) else bases:
        layers += read_yaml(os.path.join(os.path.dirname(path), str(base)), _seen + (shown,))
    return layers + [(f"in {shown}", data)]


# --------------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------------
_OVERRIDE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*=")


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate `key=value` overrides (a dotted name, '=', anything) from the other arguments, wherever
    they stand on the command line: (overrides, rest). Paths and flags never match (`/a=b`, `--x=y`)."""
    overrides = [a for a in argv if _OVERRIDE.match(a)]
    return overrides, [a for a in argv if not _OVERRIDE.match(a)]


def parse_overrides(overrides: list[str]) -> dict:
    """`["optimizer.lr=3e-4", "model.num_layers=4"]` -> nested dict; values parsed as YAML."""
    out: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(item, "command-line overrides must look like key=value")
        try:
            value = yaml_load(raw) if raw.strip() != "" else None
        except yaml.YAMLError as e:
            raise ConfigError(key, f"cannot parse value {raw!r}: {str(e).splitlines()[0]}", "on the command line") from None
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(key, f"'{p}' was given a value on the command line and cannot also have keys")
        node[leaf] = value
    return out


def nest(flat: dict) -> dict:
    """{"a.b": 1} -> {"a": {"b": 1}}; None values are left out (flags that were not given)."""
    out: dict = {}
    for key, value in flat.items():
        if value is None:
            continue
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
T = typing.TypeVar("T")


def load(schema: type[T], path: str | None = None, overrides: list[str] | None = None,
         flags: dict | None = None) -> T:
    """The schema's dataclass with the values of `path` (and its bases), `overrides` (`key=value`) and
    `flags` ({dotted key: value}, values taken as given; None = not given) applied in that order."""
    layers = read_yaml(path) if path else []
    layers.append(("on the command line", parse_overrides(overrides or [])))
    layers.append(("by a command-line flag", nest(flags or {})))
    conf = OmegaConf.structured(schema)
    for source, data in layers:
        for key, value, typ in _leaves(schema, data, "", source):
            try:
                OmegaConf.update(conf, key, value, merge=True)
            except OmegaConfBaseException as e:
                raise ConfigError(_error_key(key, e), _type_message(typ, value, e), source) from None
    try:
        obj = OmegaConf.to_object(conf)
    except OmegaConfBaseException as e:  # an interpolation that does not resolve
        raise ConfigError(getattr(e, "full_key", None) or "config", _first_line(e)) from None
    check_choices(obj)
    return obj


def _leaves(schema, data: dict, prefix: str, source: str) -> Iterator[tuple[str, Any, Any]]:
    """(full key, value, field type) for every value in `data`, descending into sections; refuses keys
    the schema does not have. A section given a scalar is converted by its `from_config_value`."""
    hints = typing.get_type_hints(schema)
    names = [f.name for f in fields(schema)]
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            inside = [f"{prefix}{n}.{k}" for n in names if is_dataclass(hints[n]) and k in
                      {f.name for f in fields(hints[n])}]  # a key given without its section
            hint = (f"; did you mean '{prefix}{close[0]}'?" if close else f"; did you mean '{inside[0]}'?"
                    if len(inside) == 1 else f"; {prefix.rstrip('.') or 'the top level'} has {', '.join(names)}")
            raise ConfigError(key, f"unknown key{hint}", source)
        typ = hints[k]
        convert = getattr(typ, "from_config_value", None)  # a section that also takes a shorthand
        if convert is not None:
            try:
                v = convert(v)
            except ValueError as e:
                raise ConfigError(key, str(e), source) from None
        elif is_dataclass(typ):
            if not isinstance(v, dict):
                raise ConfigError(key, f"must be a mapping (a section with keys {', '.join(f.name for f in fields(typ))}), "
                                       f"got {v!r}", source)
            yield from _leaves(typ, v, key + ".", source)
            continue
        yield key, v, typ


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _type_message(typ, value, error) -> str:
    optional = get_origin(typ) in (Union, types.UnionType) and type(None) in get_args(typ)
    inner = [a for a in get_args(typ) if a is not type(None)] if optional else [typ]
    if len(inner) == 1 and inner[0] in _TYPE_WORDS:
        return f"must be {_TYPE_WORDS[inner[0]]}{' or null' if optional else ''}, got {value!r}"
    if len(inner) == 1 and (get_origin(inner[0]) or inner[0]) is list and not isinstance(value, (list, tuple)):
        return f"must be a list, got {value!r}"
    return _first_line(error)


def _error_key(key: str, error) -> str:
    full = getattr(error, "full_key", None)
    return full if full and str(full).startswith(key) else key


def _first_line(error) -> str:
    return str(getattr(error, "msg", None) or error).strip().splitlines()[0]


def check_choices(obj, prefix: str = "") -> None:
    """Every field with `choices` metadata holds one of them (recursively, through sections)."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            check_choices(value, f"{prefix}{f.name}.")
        elif "choices" in f.metadata and value not in f.metadata["choices"]:
            raise ConfigError(f"{prefix}{f.name}", f"must be one of {list(f.metadata['choices'])}, got {value!r}")


def require(ok: bool, key: str, message: str) -> None:
    """For `validate` functions: raise ConfigError(key, message) unless `ok`."""
    if not ok:
        raise ConfigError(key, message)


def to_yaml(obj) -> str:
    """The resolved configuration as YAML (what a run records and `show` prints)."""
    return OmegaConf.to_yaml(OmegaConf.structured(obj))


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


# --------------------------------------------------------------------------------------------------
# The key table (docs are generated from the schema, so the list cannot drift)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KeyDoc:
    key: str
    type: str
    default: str
    help: str


def describe(schema, prefix: str = "", instance=None) -> list[KeyDoc]:
    """Every key of `schema` (through its sections) with type, default and help."""
    out = []
    hints = typing.get_type_hints(schema)
    instance = schema() if instance is None else instance
    for f in fields(schema):
        typ = hints[f.name]
        if is_dataclass(typ):
            out += describe(typ, f"{prefix}{f.name}.", getattr(instance, f.name))
            continue
        choices = f.metadata.get("choices")
        help_text = f.metadata.get("help", "")
        if choices:
            help_text += f"; one of: {', '.join('null' if c is None else str(c) for c in choices)}"
        if f.metadata.get("from"):
            help_text += f" ({f.metadata['from']}.{f.name})"
        out.append(KeyDoc(prefix + f.name, _type_name(typ), _yaml_value(getattr(instance, f.name)), help_text.strip()))
    return out


def _type_name(t) -> str:
    if t in _TYPE_WORDS:
        return t.__name__
    origin, args = get_origin(t), get_args(t)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]" if args else origin.__name__
    return getattr(t, "__name__", str(t))


def _yaml_value(v) -> str:
    if is_dataclass(v):
        v = dataclasses.asdict(v)
    return yaml.safe_dump(v, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def markdown_table(schema) -> str:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for d in describe(schema):
        rows.append(f"| `{d.key}` | {d.type} | `{d.default}` | {d.help.replace('|', '/')} |")
    return "\n".join(rows)



# --------------------------------------------------------------------------------------------------
# python -m megatron_qwen_image.config: print a resolved config; (re)generate the key docs
# --------------------------------------------------------------------------------------------------
# The documented programs' schemas, by import path (this package does not import the programs).
# name: (title in the docs, the module with its `load_config`, the schema)
PROGRAMS = {"train": ("trainer (`python -m consumer.train`)", "consumer.config", "TrainConfig"),
            "producer": ("producer (`python -m producer`)", "producer.config", "ProducerConfig")}
DOCS_FILE = "docs/configuration.md"
README_BEGIN, README_END = "<!-- config-sections: generated by `make docs` -->", "<!-- end config-sections -->"


def sections_table(schemas: dict) -> str:
    rows = ["| program | section | keys | what |", "|---|---|---|---|"]
    for program, schema in schemas.items():
        hints = typing.get_type_hints(schema)
        top = [f.name for f in fields(schema) if not is_dataclass(hints[f.name])]
        if top:
            rows.append(f"| {program} | (top level) | {', '.join(f'`{k}`' for k in top)} | |")
        for f in fields(schema):
            typ = hints[f.name]
            if is_dataclass(typ):
                doc = " ".join((typ.__doc__ or "").split())
                rows.append(f"| {program} | `{f.name}` | {len(describe(typ))} | {doc} |")
    return "\n".join(rows)


def docs_text(schemas: dict) -> str:
    parts = ["# Configuration keys", "",
             "Generated from the config dataclasses by `make docs` (a test checks that this file is current).",
             "Both programs read YAML files with `base:` chaining and take `key=value` overrides anywhere on the",
             "command line; see the README's Configuration section.", ""]
    for program, schema in schemas.items():
        parts += [f"## The {program}", "", markdown_table(schema), ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m megatron_qwen_image.config")
    sub = ap.add_subparsers(dest="cmd", required=True)
    show = sub.add_parser("show", help="print a program's resolved configuration as YAML")
    show.add_argument("program", choices=sorted(PROGRAMS))
    show.add_argument("--config", help="YAML file")
    docs = sub.add_parser("docs", help=f"write {DOCS_FILE} and the README's section table")
    docs.add_argument("--check", action="store_true", help="only check that they are current (exit 1 if not)")
    argv = sys.argv[1:] if argv is None else argv
    overrides, rest = split_overrides(argv)
    args = ap.parse_args(rest)
    if args.cmd == "show":
        module = importlib.import_module(PROGRAMS[args.program][1])
        try:
            cfg = module.load_config(args.config, overrides)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(to_yaml(cfg), end="")
        return 0
    schemas = {title: getattr(importlib.import_module(module), name) for title, module, name in PROGRAMS.values()}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    docs_path, readme_path = os.path.join(root, DOCS_FILE), os.path.join(root, "README.md")
    with open(readme_path) as f:
        readme = f.read()
    begin, end = readme.index(README_BEGIN) + len(README_BEGIN), readme.index(README_END)
    new_readme = readme[:begin] + "\n" + sections_table(schemas) + "\n" + readme[end:]
    new_docs = docs_text(schemas)
    current = open(docs_path).read() if os.path.exists(docs_path) else ""
    if args.check:
        stale = [p for p, old, new in ((DOCS_FILE, current, new_docs), ("README.md", readme, new_readme)) if old != new]
        if stale:
            print(f"out of date: {', '.join(stale)}; run `make docs`", file=sys.stderr)
            return 1
        return 0
    with open(docs_path, "w") as f:
        f.write(new_docs)
    with open(readme_path, "w") as f:
        f.write(new_readme)
    print(f"wrote {DOCS_FILE} and README.md's section table")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
