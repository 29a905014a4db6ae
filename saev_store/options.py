"""Command-line options made from config dataclasses: each option is declared once, as a field
(ARCHITECTURE.md, "Options: one declaration each").

A config dataclass (`RecordConfig`, `trainers.config.TrainConfig` / `SAEConfig`, the `tools.config`
classes) is the one place an option lives: the field's name gives its flag (`batch_size` ->
`--batch-size`), its type the click type (`Literal[...]` or `choices=` its allowed values, a bool a
switch, `X | None` an optional value, `tuple[X, ...]` a comma list or, with `multiple=True`, a
repeatable flag), its default the default, and the docstring under it the help text. `options(Config)`
turns the fields into click options, `build(Config, params)` turns click's values back into a Config,
and `tests/test_readme_options.py` checks README's option tables against the same click commands
(`markdown_table` makes the table a command should have; the test prints it when README differs). Adding a documented field therefore adds
its flag, its help and its README check, with nothing declared twice.

Per-field settings go in the field's metadata through `option(default, ...)`:
  flag="--out"            another flag name than the field's
  cli=False               not an option (set by code, or another option stands for it)
  argument=True           a positional argument instead of an option
  multiple=True           repeatable flag (`--hook A --hook B`) for a tuple field
  choices=(...)           allowed values (when the type is not a Literal)
  aliases=("--readers",)  deprecated spellings, accepted but hidden from --help
  short="-k"              a one-letter spelling
  flatten=True            a nested config dataclass whose fields are options of their own
  when=(field, values)    the option applies only while `field` is one of `values`: giving it
                          otherwise is an error (`check_applies` and `build`), not silence
Anything else in the metadata (e.g. the sweep grid of an SAE field) is for the config's own module.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from typing import Any, Callable, Literal, NamedTuple

import click

from .errors import UserError

MISSING = dataclasses.MISSING
GIVEN = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
"""Where a value the user gave comes from (as opposed to a default)."""


def option(default: Any = MISSING, *, default_factory: Any = MISSING, **meta) -> Any:
    """A dataclass field with option settings in its metadata (see the module docstring)."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring written under the field in the class body (and its bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for a, b in zip(body, body[1:]):
            if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                    and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
                docs[a.target.id] = inspect.cleandoc(b.value.value)
    return docs


class Spec(NamedTuple):
    """One option, as derived from a field."""

    name: str
    """Parameter name: the field's name (nested fields of a flattened config keep their own name)."""
    path: tuple[str, ...]
    """Where the value goes: ("batch_size",), or ("style", "n_cols") for a flattened field."""
    flag: str
    """`--batch-size`."""
    kind: str
    """value, switch (--x/--no-x), flag (--x, off by default), list (comma-separated), multiple, argument."""
    type: Any
    """Python type of one value (int, float, str, bool)."""
    choices: tuple | None
    """Allowed values, or None."""
    default: Any
    """The field's default (MISSING when required)."""
    help: str
    """The field's docstring, on one line."""
    n_items: int | None
    """Exact length of a fixed-size tuple (`tuple[float, float]`), else None."""
    aliases: tuple[str, ...]
    """Deprecated, hidden spellings of the flag."""
    short: str | None
    """A one-letter spelling shown beside the flag (`-k`), or None."""
    when: tuple[str, tuple] | None
    """(field, values) while which the option applies, or None."""
    required: bool
    """The command line must give it (no default, or `required=True` where the Python API has a default)."""


def _unwrap(tp) -> tuple[Any, bool]:
    """(type without None, whether None is allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), len(args) < len(typing.get_args(tp))
    return tp, False


def _default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


@functools.cache
def specs(cls: type) -> tuple[Spec, ...]:
    """The options of config class `cls`, in field order (flattened configs in place)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if meta.get("cli", True) is False:
            continue
        tp, _ = _unwrap(hints[f.name])
        if meta.get("flatten"):
            out += [s._replace(path=(f.name, *s.path)) for s in specs(tp)]
            continue
        choices, n_items = meta.get("choices"), None
        if meta.get("argument"):
            kind = "argument"
        elif typing.get_origin(tp) is tuple:
            args = typing.get_args(tp)
            kind = "multiple" if meta.get("multiple") else "list"
            if len(args) != 2 or args[1] is not Ellipsis:
                n_items = len(args)
            tp = args[0]
        elif tp is bool:
            kind = "switch" if _default(f) is True or meta.get("negatable") else "flag"
        else:
            kind = "value"
        if typing.get_origin(tp) is Literal:
            choices = typing.get_args(tp)
            tp = type(choices[0])
        out.append(Spec(
            name=f.name, path=(f.name,), flag=meta.get("flag", "--" + f.name.replace("_", "-")), kind=kind, type=tp,
            choices=tuple(choices) if choices is not None else None, default=_default(f),
            help=" ".join(docs.get(f.name, "").split()), n_items=n_items, aliases=tuple(meta.get("aliases", ())),
            when=meta.get("when"), required=bool(meta.get("required", _default(f) is MISSING)), short=meta.get("short"),
        ))
    return tuple(out)


def format_value(v: Any) -> str:
    """How a default is written in --help and README tables."""
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (tuple, list)):
        return ",".join(format_value(x) for x in v)
    return str(v)


def parse_one(spec: Spec, text: str) -> Any:
    """One value of an option from its text (or a TOML scalar): int, float, str or bool, within its choices."""
    tp = spec.type
    try:
        if tp is bool and isinstance(text, str):
            low = text.strip().lower()
            if low not in ("true", "false", "on", "off", "1", "0", "yes", "no"):
                raise ValueError(text)
            value = low in ("true", "on", "1", "yes")
        elif tp is int and not isinstance(text, bool):
            f = float(text)
            if f != int(f):
                raise ValueError(text)
            value = int(f)
        elif tp in (float, str):
            value = tp(text.strip() if isinstance(text, str) else text)
        else:
            value = text
    except (TypeError, ValueError):
        raise UserError(f"{spec.flag} {text!r} is not {'an integer' if tp is int else 'a number' if tp is float else 'valid'}.") from None
    if spec.choices is not None and value not in spec.choices:
        raise UserError(f"{spec.flag} {text!r} is not one of {', '.join(map(str, spec.choices))}.")
    return value


def _list_callback(spec: Spec) -> Callable:
    def convert(ctx, param, value):
        if value is None or isinstance(value, tuple):
            return value
        try:
            items = tuple(parse_one(spec, v) for v in str(value).split(",") if v.strip())
        except UserError as err:
            raise click.BadParameter(str(err)) from None
        if spec.n_items is not None and len(items) != spec.n_items:
            raise click.BadParameter(f"give {spec.n_items} comma-separated values, got {value!r}.")
        return items

    return convert


class DocumentedOption(click.Option):
    """A click option whose default, as README and --help write it, is not its value (`doc_default`): the
    SAE flags default to None (not given) and document the grid a sweep then trains."""

    def __init__(self, *args, doc_default: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.doc_default = doc_default


def click_param(spec: Spec, *, default: Any = MISSING, help: str | None = None, doc_default: str | None = None) -> list[Callable]:
    """The click decorator(s) of one option: the option itself plus a hidden one per deprecated alias.
    `default` / `help` replace the field's, `doc_default` documents a default that is not the value
    (the SAE sweep flags take lists and default to the sweep's grid)."""
    default = spec.default if default is MISSING else default
    text = spec.help if help is None else help
    show = (default is not MISSING and default is not None and default != () and spec.kind != "flag"
            and not (spec.required and spec.kind == "value"))
    kw: dict[str, Any] = {"help": text}
    if spec.kind == "argument":
        return [click.argument(spec.name, type=spec.type, required=spec.required)]
    if spec.kind == "flag":
        decls, kw["is_flag"], kw["default"] = [spec.flag], True, bool(default)
    elif spec.kind == "switch":
        decls, kw["default"] = [f"{spec.flag}/--no-{spec.flag[2:]}"], bool(default)
        kw["show_default"] = True
    elif spec.kind == "multiple":
        decls, kw["multiple"], kw["type"] = [spec.flag], True, spec.type
        kw["default"] = () if default in (MISSING, None) else tuple(default)
    elif spec.kind == "list":
        decls, kw["callback"] = [spec.flag], _list_callback(spec)
        kw["default"] = None if default in (MISSING, None) else format_value(default)
        kw["metavar"] = "LIST"
    else:
        decls = [spec.flag]
        kw["type"] = spec.type if spec.choices is None else click.Choice([str(c) for c in spec.choices])
        if spec.required:
            kw["required"] = True
        else:
            kw["default"] = default
    if show and "show_default" not in kw:
        kw["show_default"] = True
    if spec.short:
        decls = [spec.short, *decls]
    if doc_default is not None:
        kw["cls"], kw["doc_default"] = DocumentedOption, doc_default
        kw["help"] = f"{text}  [default: {doc_default}]"
    out = [click.option(*decls, spec.name, **kw)]
    for alias in spec.aliases:
        out.append(click.option(alias, f"{spec.name}__{alias.strip('-').replace('-', '_')}", hidden=True, default=None,
                                type=kw.get("type", str), help=f"deprecated spelling of {spec.flag}"))
    return out


def options(cls: type, *, exclude: tuple[str, ...] = (), only: tuple[str, ...] | None = None) -> Callable:
    """Decorator adding the options of config class `cls` (all fields, or `only` these, but `exclude`) to a
    click command."""

    def decorate(fn):
        chosen = [s for s in specs(cls) if s.name not in exclude and (only is None or s.name in only)]
        for spec in reversed(chosen):
            for deco in reversed(click_param(spec)):
                fn = deco(fn)
        return fn

    return decorate


def given(ctx: click.Context | None = None) -> set[str]:
    """Parameter names the user gave on the command line (or through the environment)."""
    ctx = ctx or click.get_current_context()
    return {name for name in ctx.params if ctx.get_parameter_source(name) in GIVEN}


def _pop_aliases(cls: type, params: dict) -> dict:
    params = dict(params)
    for spec in specs(cls):
        for alias in spec.aliases:
            key = f"{spec.name}__{alias.strip('-').replace('-', '_')}"
            value = params.pop(key, None)
            if value is None:
                continue
            click.echo(f"warning: {alias} is deprecated; use {spec.flag}.", err=True)
            params[spec.name] = value
    return params


def build(cls: type, params: dict, *, explicit: set[str] | None = None, **extra) -> Any:
    """The config `cls` from click's parameter values (the fields' names; nested configs rebuilt),
    plus `extra` fields. With `explicit` (the names the user gave), an option given while its `when`
    condition does not hold is an error even at its default value."""
    params = _pop_aliases(cls, params)
    kwargs: dict[str, Any] = dict(extra)
    nested: dict[str, dict] = {}
    all_specs = specs(cls)
    for spec in all_specs:
        if spec.name not in params:
            continue
        value = params[spec.name]
        if spec.kind == "multiple":
            value = tuple(value)
        if len(spec.path) == 1:
            kwargs[spec.name] = value
        else:
            nested.setdefault(spec.path[0], {})[spec.path[1]] = value
    hints = typing.get_type_hints(cls)
    for outer, values in nested.items():
        kwargs[outer] = _unwrap(hints[outer])[0](**values)
    cfg = cls(**kwargs)
    if explicit:
        for spec in all_specs:
            if spec.name in explicit and spec.when is not None:
                _check_when(cfg, spec, all_specs, force=True)
    return cfg


def _lookup(cfg: Any, name: str) -> Any:
    if hasattr(cfg, name):
        return getattr(cfg, name)
    for f in dataclasses.fields(cfg):
        inner = getattr(cfg, f.name)
        if dataclasses.is_dataclass(inner) and hasattr(inner, name):
            return getattr(inner, name)
    raise AttributeError(name)


def _check_when(cfg: Any, spec: Spec, all_specs: tuple[Spec, ...], force: bool = False) -> None:
    other, values = spec.when
    if _lookup(cfg, other) in values:
        return
    value = _lookup(cfg, spec.name)
    if not force and value == spec.default:
        return
    flags = {s.name: s.flag for s in all_specs}
    want = " or ".join("not given" if v is None else format_value(v) for v in values)
    have = _lookup(cfg, other)
    raise UserError(f"{spec.flag} ({spec.name}={format_value(value)}) only applies when {flags.get(other, other)} is {want}, "
                    f"but it is {'not given' if have is None else format_value(have)}: it would do nothing. Leave it out.")


def check_applies(cfg: Any) -> None:
    """For `__post_init__`: a field set away from its default while its `when` condition does not hold
    is an error naming both (it would be ignored)."""
    all_specs = specs(type(cfg))
    for spec in all_specs:
        if spec.when is not None and len(spec.path) == 1:
            _check_when(cfg, spec, all_specs)


def check_choices(cfg: Any) -> None:
    """For `__post_init__`: every field with allowed values holds one of them (the Python API does not
    go through click's checks)."""
    for spec in specs(type(cfg)):
        if spec.choices is None or len(spec.path) != 1:
            continue
        value = getattr(cfg, spec.name)
        if value is None and spec.default is None:
            continue
        if value not in spec.choices:
            raise UserError(f"{spec.flag} {value!r} is not one of {', '.join(map(str, spec.choices))} ({spec.name}).")


def markdown_table(command: click.Command) -> str:
    """The README option table of a click command: one row per visible option, `| option | default |
    meaning |`, the meaning being its help text (README may word it its own way; tests compare the first
    two columns)."""
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for cell, default, text in table_rows(command):
        rows.append(f"| {cell} | {default} | {text} |")
    return "\n".join(rows) + "\n"


def table_rows(command: click.Command) -> list[tuple[str, str, str]]:
    """(option cell, default cell, help) per visible option of `command`, as README writes them."""
    out = []
    for p in command.params:
        if not isinstance(p, click.Option) or p.hidden or "--help" in p.opts:
            continue
        names = "/".join(p.opts + p.secondary_opts) if p.secondary_opts else ", ".join(sorted(p.opts, key=len, reverse=True))
        if isinstance(p.type, click.Choice):
            names += " " + "\\|".join(map(str, p.type.choices))
        cell = f"`{names}`"
        text = p.help or ""
        if getattr(p, "doc_default", None) is not None:
            default = f"`{p.doc_default}`"
            text = text.removesuffix(f"  [default: {p.doc_default}]")
        elif p.required:
            default = "required"
        elif (p.is_flag and not p.secondary_opts) or p.multiple or p.default is None or p.default == ():
            default = ""
        else:
            default = f"`{format_value(p.default)}`"
        out.append((cell, default, " ".join(text.replace("|", "\\|").split())))
    return out


def commands(group: click.Command, prefix: str) -> dict[str, click.Command]:
    """Every command of a CLI by its full name (`saev-store record`); a plain command under `prefix`."""
    if not isinstance(group, click.Group):
        return {prefix: group}
    return {f"{prefix} {name}": cmd for name, cmd in group.commands.items()}

