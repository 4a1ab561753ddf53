"""fab flags defined once: a dataclass field whose metadata holds the flag's help and how its text becomes the value.
A fab task's signature and help are made from such fields (fab_signature, fab_help), and the options object from the
flags' values (from_flags), so a new flag is one field, in the class that reads it (infra/options.py's, the Job).
Fields of a nested options class (`nested(...)`) contribute their flags too.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import shlex
from collections.abc import Callable
from dataclasses import field
from typing import Any

from job.errors import UserError, number


def option(default: Any = None, help: str = "", *, parse: Callable[[str, str], Any] | None = None, flag: str | None = None,  # noqa: A002
           factory: Callable[[], Any] | None = None) -> Any:
    """A field that is a fab flag: `help` its help text, `parse(text, "--flag")` its value from the flag's text (None:
    the text as it is; a bool field is a switch), `flag` its name where it is not the field's."""
    metadata = {"help": help, "parse": parse, "flag": flag}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def nested(cls: type) -> Any:
    """A field holding another options class, whose flags are this one's too."""
    return field(default_factory=cls, metadata={"nested": cls})


# --- how a flag's text becomes a value ----------------------------------------------------------------------
def integer(minimum: int = 1, maximum: int | None = None) -> Callable[[str, str], int]:
    return lambda text, flag: number(text, flag, int, minimum, maximum)


def decimal(minimum: float = 0, above: float | None = None) -> Callable[[str, str], float]:
    """A finite number of at least `minimum` (and more than `above`: 0 is "must be positive", whatever the minimum)."""
    return lambda text, flag: number(text, flag, float, minimum, above=above)


def optional(parse: Callable[[str, str], Any]) -> Callable[[str, str], Any]:
    """`auto` (or nothing) leaves the value unset."""
    return lambda text, flag: None if text in ("", "auto") else parse(text, flag)


def words(text: str, flag: str) -> list[str]:
    """A quoted flag value split as a shell would, or one line for a quote left open."""
    try:
        return shlex.split(text or "")
    except ValueError as e:  # shlex's own words: "No closing quotation", "No escaped character"
        raise UserError(f"{flag} {text!r} cannot be split into words ({e}): it is split like a shell command line, "
                        "so close the quote (or escape it with a backslash)") from None


def pairs(text: str, flag: str) -> dict[str, str]:
    out = {}
    for item in words(text, flag):
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise UserError(f"{flag} takes KEY=VALUE pairs separated by spaces, got {item!r}")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
            raise UserError(f"{flag}: {k!r} is not a variable's name (letters, digits and _, not starting with a digit)")
        out[k] = v
    return out


def host_list(text: str, flag: str) -> list[str]:
    return [h.strip() for h in (text or "").split(",") if h.strip()]


def checked(check: Callable[[str], Any]) -> Callable[[str, str], str]:
    """The text as it is, once `check` (which raises a UserError) accepted it: a typo fails before anything happens."""
    def parse(text, flag):
        check(text)
        return text

    return parse


# --- fields <-> fab's flags -------------------------------------------------------------------------------------
def _flags(cls: type) -> list[tuple[str, dataclasses.Field]]:
    """(flag name, field) of every flag of `cls` and of the classes nested in it, in order."""
    out = []
    for f in dataclasses.fields(cls):
        if "nested" in f.metadata:
            out += _flags(f.metadata["nested"])
        elif "help" in f.metadata:
            out.append((f.metadata["flag"] or f.name, f))
    return out


def _fab_default(f: dataclasses.Field) -> Any:
    """The default as fab shows and passes it: a switch's bool, else text (None: not given)."""
    if f.default is dataclasses.MISSING or f.default is None:
        return None
    return f.default if isinstance(f.default, bool) else str(f.default)


def fab_help(cls: type) -> dict[str, str]:
    return {name: f.metadata["help"] for name, f in _flags(cls)}


def fab_signature(cls: type) -> inspect.Signature:
    """A fab task's signature (the Context first) with one parameter per flag; Invoke reads the flags from it."""
    params = [inspect.Parameter("c", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=_fab_default(f)) for name, f in _flags(cls)]
    return inspect.Signature(params)


def from_flags(cls: type, values: dict[str, Any]):
    """An options object from fab's flag values (text, or a switch's bool), each parsed by its field's rule."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if "nested" in f.metadata:
            kwargs[f.name] = from_flags(f.metadata["nested"], values)
            continue
        if "help" not in f.metadata:
            continue
        name = f.metadata["flag"] or f.name
        value = values.get(name, _fab_default(f))
        if value is None or value == _fab_default(f) and not isinstance(value, str):
            continue  # not given: the field's own default
        parse = f.metadata["parse"]
        kwargs[f.name] = parse(value, "--" + name.replace("_", "-")) if parse and not isinstance(value, bool) else value
    return cls(**kwargs)
