"""YAML config files over an argparse parser: defaults, then ``--config <yaml>``, then the command line.

A config file is a mapping whose keys are the parser's settings, spelt as the ``dest`` or as any long flag with
``-`` or ``_`` (``batch_size``, ``batch-size``, ``learning_rate`` for ``--lr/--learning-rate``). Every value goes
through the flag's own ``type`` and ``choices`` as if it had been typed on the command line, so a file cannot
smuggle in a value the CLI would refuse (argparse itself never checks defaults). Extra top-level sections that are
not flags (e.g. a track's ``model:`` mapping) are accepted only when the caller names them, each with its own
checker. Any problem raises :class:`ConfigError` naming the file and the key.

Usage in an entry point::

    parser = build_parser()                       # must define --config
    args = parse_args_with_config(parser, argv, sections={"model": check_model_section})
    setting_source(args, "seed")                  # "the command line", "--config run.yaml" or "the default"

The parsed namespace remembers where each setting came from (:func:`setting_source`), so that an error about a
setting can tell the user where to change it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence

import yaml

__all__ = ["ConfigError", "ParsedSettings", "load_config_file", "parse_args_with_config", "setting_source"]

SectionChecker = Callable[[Any, str], Any]
"""``checker(value, where) -> value``: validates (and may normalise) one extra section; ``where`` names the
file and key for error messages; raises :class:`ConfigError`."""

# Never settable from a file: the file's own path, and argparse's help/version actions.
_NOT_SETTINGS = (argparse._HelpAction, argparse._VersionAction)


class ConfigError(ValueError):
    """The settings are inconsistent: a bad config file, flag value, output folder or device."""


class ParsedSettings(argparse.Namespace):
    """An ``argparse.Namespace`` that also knows where each setting came from.

    ``setting_sources`` (``{dest: "the command line" | "--config FILE"}``; settings absent from it kept their
    default) lives in a slot, not in ``vars(args)``, so it never leaks into a run's recorded config.
    """

    __slots__ = ("setting_sources",)


class _NotOnCommandLine(list):
    """Placeholder put in every dest before a second parse of the command line: argparse fills in defaults only
    where a dest is missing, so the dests still holding it were not given on the command line. A list subclass, so
    ``action='append'`` flags can append to it."""


def _command_line_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> Optional[set]:
    """The dests that ``argv`` sets explicitly, or None when that cannot be told (a count action, say)."""
    probe = argparse.Namespace(**{a.dest: _NotOnCommandLine() for a in parser._actions
                                  if a.dest != argparse.SUPPRESS})
    try:
        parser.parse_args(list(argv), namespace=probe)
    except (SystemExit, Exception):  # noqa: BLE001 -- provenance is a courtesy for messages, never fatal
        return None
    return {k for k, v in vars(probe).items() if not (isinstance(v, _NotOnCommandLine) and not v)}


def setting_source(args: argparse.Namespace, dest: str) -> str:
    """Where ``args.<dest>`` came from: ``"the command line"``, ``"--config FILE"``, ``"the default"``, or ``""``
    when unknown (a namespace not made by :func:`parse_args_with_config`)."""
    sources = getattr(args, "setting_sources", None)
    if sources is None:
        return ""
    return sources.get(dest, "the default")


def _yaml_key_map(parser: argparse.ArgumentParser, exclude: Iterable[str] = ()) -> Dict[str, argparse.Action]:
    """Every spelling a YAML key may use, mapped to its action: the dest and each long flag with '-' or '_'.

    The ``config`` dest and the ``exclude`` dests are left out.
    """
    skip = {"config", *exclude}
    keys: Dict[str, argparse.Action] = {}
    for action in parser._actions:
        if isinstance(action, _NOT_SETTINGS) or action.dest in skip or action.dest == argparse.SUPPRESS:
            continue
        keys[action.dest] = action
        for opt in action.option_strings:
            # A negated flag (--no-tensorboard of a BooleanOptionalAction) is only spelt by its dest:
            # `no_tensorboard: true` would read as the opposite of what it sets.
            if opt.startswith("--") and not (opt.startswith("--no-") and action.dest != opt[2:].replace("-", "_")):
                keys[opt[2:].replace("-", "_")] = action
    return keys


def _convert(action: argparse.Action, value: Any) -> Any:
    """One value through the flag's ``type`` (``str`` when it has none). YAML numbers are passed as their text, as
    the shell would pass them: ``int('7.5')`` fails where ``int(7.5)`` would silently truncate, and ``float('2e-3')``
    reads the exponent notation that YAML 1.1 leaves as a string."""
    if isinstance(value, bool) and action.type is None:
        raise TypeError("expected a string, got a boolean")
    if isinstance(value, (bool, int, float)):
        value = str(value)
    if action.type is None:
        if not isinstance(value, str):
            raise TypeError(f"expected a single value, got a {type(value).__name__}")
        return value
    return action.type(value)


def _check_choice(action: argparse.Action, value: Any, where: str) -> None:
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, action.choices))}")


def _coerce(action: argparse.Action, value: Any, where: str) -> Any:
    """Run a YAML value through the flag's type, nargs and choices, as if it had been typed on the command line.

    ``null`` keeps the flag's "unset" value (None). Flags taking several values (``nargs``) and repeatable flags
    (``action='append'``: the file gives the list, the command line appends to it) need a YAML list;
    store_true/false and ``BooleanOptionalAction`` flags need ``true``/``false``; count flags an integer.
    """
    if value is None:
        return None
    if isinstance(action, (argparse._StoreConstAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if isinstance(action, argparse._CountAction):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{where}: expected a count (an integer >= 0), got {value!r}")
        return value
    several = action.nargs not in (None, "?") or isinstance(action, argparse._AppendAction)
    try:
        if several:
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{where}: expected a list, got {value!r}")
            if isinstance(action.nargs, int) and len(value) != action.nargs:
                raise ConfigError(f"{where}: expected {action.nargs} values, got {len(value)}")
            if action.nargs == "+" and not value:
                raise ConfigError(f"{where}: expected at least one value, got an empty list")
            values = [_convert(action, v) for v in value]
        else:
            values = [_convert(action, value)]
    except ConfigError:
        raise
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        raise ConfigError(f"{where}: invalid value {value!r}: {e}") from None
    for v in values:
        _check_choice(action, v, where)
    return values if several else values[0]


def load_config_file(parser: argparse.ArgumentParser, path: str | Path,
                     sections: Optional[Mapping[str, SectionChecker]] = None, *,
                     exclude: Iterable[str] = ()) -> Dict[str, Any]:
    """Parser defaults (``{dest: value}``) read from the YAML file ``path``.

    Args:
        parser: the entry point's parser; its flags define the valid keys and how values are checked.
        path: the YAML file, a mapping of settings.
        sections: extra top-level keys that are not flags, each with a ``checker(value, where)``; the checked
            value is returned under the section's name.
        exclude: dests that a file may not set (e.g. a repeatable CLI-only flag).

    Raises:
        ConfigError: missing file, YAML syntax error, not a mapping, unknown key, or a value its flag refuses;
            the message names the file (and the key).
    """
    file = Path(path)
    sections = dict(sections or {})
    if not file.is_file():
        raise ConfigError(f"config file not found: {file}")
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse config file {file} (YAML syntax error): {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {file}: {e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {file} must hold a mapping of settings, got {type(raw).__name__}")
    keys = _yaml_key_map(parser, exclude)
    out: Dict[str, Any] = {}
    for key, value in raw.items():
        where = f"{file}: key '{key}'"
        if key in sections:
            out[key] = sections[key](value, where)
            continue
        action = keys.get(str(key).replace("-", "_"))
        if action is None:
            valid = sorted({a.dest for a in keys.values()} | set(sections))
            raise ConfigError(f"{where} is not a setting; valid keys: {', '.join(valid)}")
        if action.dest in out:
            raise ConfigError(f"{where} sets '{action.dest}', which another key of the file already set")
        out[action.dest] = _coerce(action, value, where)
    return out


def parse_args_with_config(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None,
                           sections: Optional[Mapping[str, SectionChecker]] = None, *,
                           exclude: Iterable[str] = ()) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``) with the precedence defaults -> ``--config`` file -> CLI.

    ``parser`` must define a ``--config`` option (dest ``config``). A :class:`ConfigError` from the file exits
    through ``parser.error`` (usage line, message, status 2), like any bad flag. Section values end up as
    namespace attributes of their name (give them a default with ``parser.set_defaults``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    config_action = next((a for a in parser._actions if a.dest == "config"), None)
    if config_action is None or not config_action.option_strings:
        raise ValueError("parse_args_with_config: the parser has no --config option")
    # Find --config alone first: the full parse must already see the file's values as defaults.
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=parser.allow_abbrev)
    pre.add_argument(*config_action.option_strings, dest="config", default=None)
    known, _ = pre.parse_known_args(argv)
    from_file: Dict[str, Any] = {}
    if known.config:
        try:
            from_file = load_config_file(parser, known.config, sections, exclude=exclude)
        except ConfigError as e:
            parser.error(str(e))
        parser.set_defaults(**from_file)
    args = parser.parse_args(argv, namespace=ParsedSettings())
    sources = {dest: f"--config {known.config}" for dest in from_file}
    on_command_line = _command_line_dests(parser, argv)
    if on_command_line is not None:
        sources.update({dest: "the command line" for dest in on_command_line})
    args.setting_sources = sources
    return args
