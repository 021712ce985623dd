"""The ``%nexa_*`` flags, made from the settings' declarations (`nexa_nb.settings`).

A flag's long name, its aliases and its shortcuts come from the field's `Setting`; its type
and whether it takes ``none`` from the annotation; its help line is the setting's help with
the keyword of `nexa_nb.train` that means the same. Every flag defaults to None, so a flag
that is not typed stays out of the "argument" layer and the session defaults show through.
"""

from __future__ import annotations

import argparse
import difflib
import shlex
from collections.abc import Mapping
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic_arguments import ArgDecorator, argument, argument_group, real_name

from nexa_nb.settings import FIELD_NAMES, FIELDS, Field, by_group

# What `--zero none` and `--max-steps none` parse to: None itself would read as "not typed".
TYPED_NONE = type("TypedNone", (), {"__repr__": lambda self: "none"})()


def names(text: str) -> tuple[str, ...]:
    """``q_proj,v_proj`` -> ("q_proj", "v_proj"); ``none`` or nothing -> ()."""
    if text.strip().lower() == "none":
        return ()
    return tuple(name.strip() for name in text.split(",") if name.strip())


def text_parser(f: Field):
    """Reads a flag's text as field `f`'s value; `TYPED_NONE` for ``none`` where None is a value."""
    if f.meta.parse is not None:
        base = f.meta.parse
    elif f.kind is tuple:
        base = names
    elif f.kind in (int, float):
        base = f.kind
    else:
        return None  # text as typed (argparse checks `choices`)
    if not f.optional:
        return base

    def parse(text: str):
        if f.kind in (int, float) and text.strip().lower() == "none":
            return TYPED_NONE
        value = base(text)
        return TYPED_NONE if value is None else value

    parse.__name__ = base.__name__  # argparse's "invalid int value: 'x'" names the type
    return parse


def parse_text(name: str, text: str) -> Any:
    """A field's value from text typed in the form: as the flag reads it, or the text itself when it
    does not read (for the core to refuse with its message). Empty text is None."""
    f = FIELDS[name]
    if not text.strip():
        return () if f.kind is tuple and not f.optional else None
    parser = text_parser(f)
    try:
        value = parser(text.strip()) if parser else text.strip()
    except (ValueError, argparse.ArgumentTypeError):
        return text
    return None if value is TYPED_NONE else value


class _Exclusive(ArgDecorator):
    """A field's shortcuts (and its flag, if it has one), which exclude each other: ``[--fp16 | --bf16 | --fp32]``."""

    def __init__(self, f: Field):
        self.field = f

    def add_to_parser(self, parser, group):
        exclusive = (group or parser).add_mutually_exclusive_group()
        f = self.field
        if f.flag:
            exclusive.add_argument(f.flag, *f.meta.aliases, dest=f.name, choices=f.meta.choices, help=_help(f))
        for flag, value in f.meta.shortcuts:
            label = flag.removeprefix("--")
            exclusive.add_argument(
                flag,
                dest=f.name,
                action="store_const",
                const=value,
                help=_escaped(f"{label} {f.meta.help.split(':')[0]} ({f.name}={value!r})."),
            )


def _help(f: Field) -> str:
    return _escaped(f"{f.meta.help} ({f.name}=).")


def _escaped(help_text: str) -> str:
    """argparse formats help with %: a help that names a magic (%nexa_runs) must not be read as a format."""
    return help_text.replace("%", "%%")


def _argument(f: Field) -> ArgDecorator:
    if f.meta.shortcuts:
        return _Exclusive(f)
    options: dict[str, Any] = {"dest": f.name, "help": _help(f)}
    if f.kind is bool:
        options.update(action=argparse.BooleanOptionalAction, default=None)
    else:
        parser = text_parser(f)
        if parser is not None:
            options["type"] = parser
        if f.meta.choices is not None and parser is None:
            options["choices"] = f.meta.choices
        options["metavar"] = f.meta.metavar
    return argument(f.flag, *f.meta.aliases, **options)


def _decorators() -> list[ArgDecorator]:
    decorators: list[ArgDecorator] = []
    for group, group_fields in by_group().items():
        with_flags = [f for f in group_fields if f.flag or f.meta.shortcuts]
        if with_flags:
            decorators.append(argument_group(group))
            decorators += [_argument(f) for f in with_flags]
    decorators.append(argument_group("files"))
    decorators.append(
        argument(
            "--config",
            metavar="FILE",
            help="accelerate config YAML or DeepSpeed JSON, layered under the flags (config=).",
        )
    )
    return decorators


CONFIG_FLAGS = tuple(_decorators())
"""The flags of %nexa_train, %nexa_config and %nexa_export, in `nexa_nb.settings.GROUPS` order."""


def config_flags(func):
    """Add `CONFIG_FLAGS` to a magic, in the order they are listed."""
    for decorator in reversed(CONFIG_FLAGS):
        func = decorator(func)
    return func


def options_of(args) -> dict[str, Any]:
    """The flags typed, as `TrainConfig` fields: the "argument" layer of the configuration."""
    return {
        name: None if value is TYPED_NONE else value
        for name, value in vars(args).items()
        if name in FIELD_NAMES and value is not None
    }


# --- the %nexa_train line of some options ----------------------------------------------------


def _word(value) -> str:
    """A flag's value as typed: quoted only when it holds a space, which could not be typed otherwise."""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, tuple):
        return ",".join(value) or "none"
    text = "none" if value is None else str(value)
    return shlex.quote(text) if any(char.isspace() for char in text) else text


def flag_words(name: str, value: Any) -> list[str]:
    """The flags that set field `name` to `value`: ``["--zero", "3"]``, ``["--bf16"]``, ``["--lora"]``."""
    f = FIELDS[name]
    shortcut = next((flag for flag, const in f.meta.shortcuts if const == value), None)
    if shortcut:
        return [shortcut]
    if f.kind is bool:
        return [f.flag if value else "--no-" + f.flag.removeprefix("--")]
    return [f.flag, _word(value)]


def magic_line(options: Mapping[str, Any], magic: str = "%nexa_train") -> str:
    """`magic` with a flag for every option other than nexa_nb's default, in the flags' order."""
    words = [magic]
    for group_fields in by_group().values():
        for f in group_fields:
            if f.name in options and options[f.name] != f.default and (f.flag or f.meta.shortcuts):
                words += flag_words(f.name, options[f.name])
    return " ".join(words)


# --- parsing a magic's line ------------------------------------------------------------------

# argparse's problem statements and the fix for each.
_ARGPARSE_FIXES = (
    ("unrecognized arguments", "remove them"),
    ("not allowed with argument", "keep only one of the two flags"),
    ("expected one argument", "give the flag a value"),
    ("invalid choice", "use one of the values listed"),
    ("invalid", "give a value of the right type"),
    ("closing quotation", "close the quote"),
)


def did_you_mean(parser, problem: str) -> str | None:
    """'did you mean --zero?' for a mistyped flag."""
    known = [flag for action in parser._actions for flag in action.option_strings]
    typed = [word for word in problem.split(":", 1)[-1].split() if word.startswith("--")]
    close = [difflib.get_close_matches(word, known, n=1) for word in typed]
    suggestions = [(word, match[0]) for word, match in zip(typed, close) if match]
    if not suggestions:
        return None
    if len(suggestions) == 1:
        return f"did you mean {suggestions[0][1]}?"
    return "did you mean " + ", ".join(f"{match} for {word}" for word, match in suggestions) + "?"


def parse(magic, line: str):
    """Parse a magic's line; argparse's complaint becomes one UsageError line with the fix.

    ``-h`` or ``--help`` prints what ``%magic?`` shows and returns None (the pager is not
    there everywhere: nbclient, a terminal).
    """
    magic.parser.allow_abbrev = False  # "--zer 3" is a typo to report, not --zero 3
    try:
        # posix splitting: --ckpt-dir "my runs" is the folder my runs, without the quotes
        words = shlex.split(line)
        if "-h" in words or "--help" in words:
            print(magic.__doc__)
            return None
        return magic.parser.parse_args(words)
    except (UsageError, ValueError) as exc:
        problem = " ".join(str(exc).split()).rstrip(".")
        fix = next((fix for key, fix in _ARGPARSE_FIXES if key in problem), "correct the line")
        if "unrecognized arguments" in problem:
            fix = did_you_mean(magic.parser, problem) or fix
        raise UsageError(f"{problem}. Fix: {fix} (%{real_name(magic)}? lists every flag).") from None
