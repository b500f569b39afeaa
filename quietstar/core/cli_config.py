"""Typed configuration plumbing shared by every entry point.

Configs are frozen dataclasses that validate themselves in ``__post_init__``.
This module turns them into command-line flags, reads YAML overrides, and
merges the two (the CLI wins over YAML, YAML wins over the defaults).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import logging
import os
import reprlib
import types
import typing
from pathlib import Path
import sys
from typing import Any, Callable, Iterable, Iterator, TypeVar

import yaml

from quietstar.core import run_lock

C = TypeVar("C")


class ConfigError(ValueError):
    """An invalid configuration value. The message starts with ``Class.field``."""


class RunError(RuntimeError):
    """A run that cannot go on (bad data, a failed save, training that diverged): one line for the user, exit code 2."""


class _ValueRepr(reprlib.Repr):
    """The value in a ConfigError, cut to a bounded size: a YAML file's aliases can nest shared lists whose full
    repr would run to gigabytes (nine levels of nine aliases: 9**9 items), and a hexadecimal integer reads at
    any length but has no decimal repr past Python's 4300 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxstring, self.maxlong, self.maxother = 3, 200, 200, 200

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 4 * self.maxlong:  # far more digits than are shown: no need to write them all out
            return f"<an integer of {len(hex(abs(x))) - 2} hexadecimal digits>"
        return super().repr_int(x, level)


_VALUE_REPR = _ValueRepr()


def require(ok: bool, owner: object, field: str, rule: str) -> None:
    """Raise a ConfigError naming ``owner.field`` when ``ok`` is false (with the value, its repr cut to a bounded size)."""
    if not ok:
        value = getattr(owner, field, None)
        raise ConfigError(f"{type(owner).__name__}.{field}: {rule}, got {_VALUE_REPR.repr(value)}")


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and abs(value) != float("inf")


def _field_type(cls: type, field: dataclasses.Field) -> tuple[type, bool]:
    """(scalar type, optional?) of a dataclass field from its annotation."""
    hint = typing.get_type_hints(cls)[field.name]
    args = typing.get_args(hint)
    optional = type(None) in args and (typing.get_origin(hint) in (typing.Union, types.UnionType))
    if optional:
        hint = next(a for a in args if a is not type(None))
    return hint, optional


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, title: str | None = None) -> None:
    """Add one ``--field-name`` flag per field of ``cls``; every default is None (meaning: not given)."""
    group = parser.add_argument_group(title or cls.__name__)
    for field in dataclasses.fields(cls):
        hint, _ = _field_type(cls, field)
        flag = "--" + field.name.replace("_", "-")
        default = field.default if field.default is not dataclasses.MISSING else None
        help_text = f"{cls.__name__}.{field.name} (default: {default!r})"
        if hint is bool:
            group.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(flag, dest=field.name, type=hint, default=None, metavar=hint.__name__.upper(), help=help_text)


# Flags people type from other tools, and the flag of ours that means the same (used only where the parser has it)
FLAG_SYNONYMS = {"--learning-rate": "--lr", "--num-train-epochs": "--num-epochs", "--batch-size": "--micro-batch-size",
                 "--per-device-train-batch-size": "--micro-batch-size", "--gradient-accumulation-steps": "--grad-accum-steps"}


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, with its errors in one line (``<prog>: error: <message>``, exit code 2; the usage is
    left to ``--help``), and an unknown flag answered with the closest real one (``closest_flag``)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see --help\n")

    def parse_args(self, args=None, namespace=None) -> argparse.Namespace:
        """argparse's ``parse_args``, with the message of ``unrecognized`` for arguments it does not know."""
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.error(unrecognized(self, unknown))
        return parsed


def closest_flag(flag: str, known: list[str]) -> str | None:
    """The flag of ``known`` that ``flag`` was probably meant to be: the same with hyphens for underscores
    (``--max_steps``), its synonym (``--learning-rate``: ``--lr``), or the nearest by spelling; None if none is near."""
    name = flag.split("=", 1)[0].replace("_", "-")
    if name in known:
        return name
    if FLAG_SYNONYMS.get(name) in known:
        return FLAG_SYNONYMS[name]
    close = difflib.get_close_matches(name, [k for k in known if k.startswith("--")], n=1, cutoff=0.7)
    return close[0] if close else None


def unrecognized(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """The error for arguments ``parser`` does not know: each named, the first unknown flag with the closest real one."""
    known = [option for action in parser._actions for option in action.option_strings if action.help != argparse.SUPPRESS]
    flags = [arg for arg in extras if arg.startswith("-")]
    message = f"unrecognized argument{'s' if len(extras) > 1 else ''} {' '.join(extras)}"
    suggestion = closest_flag(flags[0], known) if flags else None
    return message + (f" ({flags[0]}: did you mean {suggestion}?)" if suggestion else "")


def load_yaml(path: str | Path | None) -> dict[str, Any]:
    """Read a YAML mapping; a missing file, bad YAML (named by line and column) or a non-mapping fails in one line."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML: {error.problem or error.context}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML: nested deeper than Python's recursion limit") from None
    # PyYAML's constructors raise plain errors for a scalar they cannot build: a date out of range (ValueError),
    # an integer past Python's digit limit (ValueError), a malformed !!timestamp (AttributeError).
    except (yaml.YAMLError, ValueError, TypeError, AttributeError) as error:
        raise ConfigError(f"{path}: not valid YAML: {one_line(error)}") from None
    if data is None:  # an empty file, or only comments
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of field: value, got {type(data).__name__}")
    return data


def key_list(keys: Iterable[object]) -> str:
    """Mapping keys for a one-line message, sorted and comma-separated: a name as it is, any other key (a number,
    a key with a space or a line break) as its repr."""
    return ", ".join(sorted(key if isinstance(key, str) and key.isidentifier() else repr(key) for key in keys))


def from_dict(cls: type[C], values: dict[str, Any]) -> C:
    """Build ``cls`` from a mapping, rejecting unknown keys by name."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [key for key in values if key not in names]
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown field(s) {key_list(unknown)}; known: {key_list(names)}")
    return cls(**values)


PATH_FIELDS = ("model", "deepspeed", "dataset")  # besides every field named *_dir, *_file or *_path
PATH_SUFFIXES = ("_dir", "_file", "_path")


def home_expanded(name: str, value: Any) -> Any:
    """A YAML value of a path field with ``~`` or ``~user`` at its start, expanded as the shell expands a flag's."""
    is_path = name in PATH_FIELDS or name.endswith(PATH_SUFFIXES)
    return os.path.expanduser(value) if is_path and isinstance(value, str) and value.startswith("~") else value


def build_config(cls: type[C], yaml_values: dict[str, Any], args: argparse.Namespace | None = None) -> C:
    """Defaults, then the YAML values that name a field of ``cls`` (a path field's ``~`` expanded), then the CLI
    flags that were given."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: home_expanded(k, v) for k, v in yaml_values.items() if k in names}
    if args is not None:
        values.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    return from_dict(cls, values)


def one_line(error: BaseException) -> str:
    """An exception as one line: an ``OSError`` as "<reason>: <file>", anything else as its message's first line."""
    if isinstance(error, OSError) and error.strerror and error.filename:
        return f"{error.strerror}: {error.filename}"
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _not_the_cpu_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Setting accelerator to CPU.")


@contextlib.contextmanager
def deepspeed_cpu_notice_hidden() -> Iterator[None]:
    """While the block runs, DeepSpeed's "Setting accelerator to CPU. If you have GPU or other accelerator, we
    were unable to detect it." is not printed; our entry points (``run_command``, ``engine.run_recipe``) run in it.

    DeepSpeed picks its accelerator once, when it is first imported (``get_accelerator`` in
    ``deepspeed/accelerator/real_accelerator.py``): ``DS_ACCELERATOR`` if set, else the first it detects,
    else the CPU, which it announces with that warning on its ``DeepSpeed`` logger, so every command on
    a machine without a GPU printed it. A filter on that logger drops that one message and nothing
    else, and goes when the block ends. The choice stays DeepSpeed's (``DS_ACCELERATOR=cpu`` would also
    silence it, but it overrides detection, and a wrong guess of ours would run a GPU machine on the CPU).
    Only our commands are affected: ``import quietstar`` does not import DeepSpeed (the modules that
    need it import it where they use it), so a library user's first import of it prints what it always did.
    """
    logger = logging.getLogger("DeepSpeed")  # the logger deepspeed.utils.logging creates; it keeps our filter
    logger.addFilter(_not_the_cpu_notice)
    try:
        yield
    finally:
        logger.removeFilter(_not_the_cpu_notice)


def run_command(name: str, run: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    """Run an entry point: 0 on success (or the exit status ``run`` returns, when it returns an int); a bad input
    or config prints ``quietstar <name>: error: ...`` and gives 2; Ctrl-C prints ``quietstar <name>: interrupted``
    and gives 130, as a shell does. DeepSpeed's notice that it found no GPU is not printed
    (``deepspeed_cpu_notice_hidden``). The output locks the command took (``run_lock``) go when it ends."""
    try:
        with deepspeed_cpu_notice_hidden():
            result = run(args)
    except (OSError, ValueError, RunError) as error:
        print(f"quietstar {name}: error: {one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"quietstar {name}: interrupted", file=sys.stderr)
        return 130
    finally:
        run_lock.release_held()
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
