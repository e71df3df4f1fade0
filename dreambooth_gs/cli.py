"""Shared by the command-line scripts: flags generated from an options dataclass, and user errors as one clear line
on stderr, never a traceback or a usage dump.

Each dataclass field becomes one flag ``--<name>`` (plus the ``aliases`` of its metadata): a ``bool`` is a switch,
a ``Literal`` lists its choices, a ``list`` takes one or more values, and ``--help`` shows every default.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

from .fileio import WriteFailure, first_line, write_failure

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)
T = TypeVar("T")


def run_cli(main: Callable[[Any], Any], args: Any, program: str) -> Any:
    """Call ``main(args)``; a user error (bad input, missing file) or a failed write (full disk, read-only file
    system) exits with status 2 and one line of text."""
    try:
        return main(args)
    except USER_ERRORS as err:
        print(f"{program}: error: {first_line(err, 1000)}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as err:  # a full disk or a read-only folder, from any writer (OS, safetensors, torch, PIL)
        if isinstance(err, WriteFailure):  # already says what failed and what is intact
            text = first_line(err, 1000)
        elif (reason := write_failure(err)) is not None:
            text = f"cannot write: {reason} ({first_line(err)})"
        else:
            raise
        print(f"{program}: error: {text}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"{program}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written; each flag's help ends with its default (switches and None defaults omit it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if isinstance(action, argparse._StoreTrueAction) or action.default in (None, argparse.SUPPRESS):
            return text
        if action.option_strings and not action.required and "%(default)" not in text:
            default = " ".join(map(str, action.default)) if isinstance(action.default, list) else action.default
            text += f" (default: {str(default).replace('%', '%%') or repr(default)})"
        return text


class OptionsParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``prog: error: ...; see --help``), without the usage dump, and
    whose unknown flags are named together with the nearest known one."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def known_flags(self) -> list[str]:
        return [flag for action in self._actions for flag in action.option_strings if flag.startswith("--")]

    def parse_args(self, args: Sequence[str] | None = None, namespace=None):  # type: ignore[override]
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.error(self.describe_unknown(unknown))
        return parsed

    def describe_unknown(self, unknown: Sequence[str]) -> str:
        flags = [token.split("=", 1)[0] for token in unknown if token.startswith("-")]
        if not flags:
            return f"unexpected argument {unknown[0]!r}: switches take no value, and every value follows its flag"
        known = self.known_flags()
        parts = []
        for flag in flags:
            normalised = "--" + flag.lstrip("-").replace("-", "_")
            if normalised in known and normalised != flag:
                parts.append(f"unknown flag {flag}; did you mean {normalised}?")
                continue
            near = difflib.get_close_matches(normalised, known, n=1, cutoff=0.6)
            parts.append(f"unknown flag {flag}" + (f"; did you mean {near[0]}?" if near else ""))
        return "; ".join(parts)


def _unwrap_optional(annotation: Any) -> Any:
    """``X | None`` -> X."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _argument_kwargs(field: dataclasses.Field, annotation: Any) -> dict[str, Any]:
    """argparse keyword arguments of one dataclass field."""
    help_text = field.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %: "10%" is literal
    kwargs: dict[str, Any] = {"help": help_text, "dest": field.name}
    if field.default is not dataclasses.MISSING:
        kwargs["default"] = field.default
    elif field.default_factory is not dataclasses.MISSING:
        kwargs["default"] = field.default_factory()
    else:
        kwargs["required"] = True
    kind = _unwrap_optional(annotation)
    if kind is bool:
        if kwargs.get("default") is True:
            raise TypeError(f"switch {field.name} defaults to True; name it as a negative switch (no_...)")
        kwargs["action"] = "store_true"
        kwargs["default"] = False
        return kwargs
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        kwargs.update(nargs="+", type=item, metavar=field.name.upper())
        return kwargs
    if typing.get_origin(kind) is Literal:
        kwargs["choices"] = list(typing.get_args(kind))
        return kwargs
    if kind not in (str, int, float):
        raise TypeError(f"field {field.name}: no command-line form for type {annotation!r}")
    kwargs["type"] = kind
    if "choices" in field.metadata:  # choices known only at run time (e.g. from the method registry)
        kwargs["choices"] = list(field.metadata["choices"])
    if kind is not str:
        kwargs["metavar"] = kind.__name__.upper()
    return kwargs


def options_parser(options_class: type, prog: str, description: str | None) -> OptionsParser:
    """One flag per field of ``options_class`` (its metadata's ``help`` and ``aliases``)."""
    parser = OptionsParser(
        prog=prog,
        usage="%(prog)s [options]",
        description=description,
        formatter_class=_HelpFormatter,
        allow_abbrev=False,
    )
    hints = typing.get_type_hints(options_class)
    for field in dataclasses.fields(options_class):
        flags = [f"--{field.name}", *field.metadata.get("aliases", ())]
        parser.add_argument(*flags, **_argument_kwargs(field, hints[field.name]))
    return parser


def parse_options(options_class: type[T], argv: Sequence[str] | None, prog: str, description: str | None) -> T:
    """Parse ``argv`` into ``options_class``; a value its ``__post_init__`` refuses is a one-line parser error."""
    parser = options_parser(options_class, prog, description)
    namespace = parser.parse_args(argv)
    try:
        return options_class(**vars(namespace))
    except ValueError as err:
        parser.error(first_line(err, 1000))
