"""User-facing errors: one clear line and a non-zero exit, never a traceback for a user mistake."""

from __future__ import annotations

import argparse
import errno
import functools
import math
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

from job import contract
from job.fsutil import NO_SPACE


class UserError(Exception):
    """A mistake the user can fix; the message names the problem and the fix."""

    exit_code = contract.EXIT_USER_ERROR
    # Said by every process, not only each machine's first: for what one rank can meet alone (its GPU's memory).
    every_rank = False


class SettingsMismatch(UserError):
    """An input this run's settings do not fit, with the settings that would fit it (name -> value) and what to do where
    none would. job.config's validate turns the settings into flags, with what they force (a shorter sequence for a
    smaller block), and names them only once the chosen recipe takes them as the next run will; said anywhere else,
    the line names the settings as they are."""

    def __init__(self, problem: str, settings: dict, otherwise: str):
        self.problem, self.settings, self.otherwise = problem, dict(settings), otherwise
        super().__init__(f"{problem}: pass {flags_of(settings)}")


def flags_of(settings: dict) -> str:
    """{"n_layer": 2, "block_size": 64} -> "--n-layer 2 --block-size 64"."""
    return " ".join(f"--{name.replace('_', '-')} {value}" for name, value in settings.items())


class RankLost(UserError):
    """Another rank went away mid-run (killed, crashed, its machine gone): this one cannot go on alone. Not the
    first failure, so not the status the launcher reports; its line says what this rank saw and what to resume."""

    exit_code = contract.EXIT_RANK_LOST


class TrainingDiverged(UserError):
    """The loss or the weights stopped being finite numbers; the run stopped without saving them."""

    exit_code = contract.EXIT_DIVERGED


# The reasons of the trainer's "end" event and the exit status each goes with (the table is the contract's).
END_REASONS = contract.END_REASONS


def cli_main(fn):
    """Wrap a CLI entry point so UserError prints `error: ...` on stderr and exits non-zero."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            # Under torchrun every process hits the same mistake: one line per machine is enough.
            if os.environ.get("LOCAL_RANK", "0") == "0" or e.every_rank:
                print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(e.exit_code)
        except OSError as e:
            message = file_system_error(e)
            if message is None:
                raise
            if os.environ.get("LOCAL_RANK", "0") == "0":
                print(f"error: {message}", file=sys.stderr, flush=True)
            sys.exit(contract.EXIT_USER_ERROR)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(contract.EXIT_INTERRUPTED)

    return wrapper


def file_system_error(e: OSError) -> str | None:
    """One line for what the file system refused (a full disk, a path this user may not write, a read-only mount),
    or None for an OSError that is not about the user's files (a bug: its traceback is wanted). Writers that know
    more (the checkpoint, shard and export writers) say it themselves; this is for the rest."""
    path = f" {e.filename}" if e.filename else ""
    if e.errno in NO_SPACE:
        return (f"no space left on the device{' for' + path if path else ''}: make room there (or write to another "
                "disk), then run the same command again")
    if not path:  # without a path, neither we nor the user can tell which file: keep the traceback
        return None
    if e.errno in (errno.EACCES, errno.EPERM):
        return (f"permission denied:{path} ({e.strerror}): this user (uid {os.getuid()}) may not use it; fix its owner or mode "
                f"(e.g. `sudo chown -R {os.getuid()}:{os.getgid()} DIR`, on the host for a mounted volume) or use another path")
    if e.errno == errno.ENOTDIR:
        return f"{path.strip()}: a part of this path is a file, not a directory: choose another path"
    if e.errno == errno.EROFS:
        return f"{path.strip()} is on a read-only file system: use a writable path (a volume mounted with :ro?)"
    return None


def _number(value, cast, minimum=None, maximum=None, above=None):
    """`value` as a finite int or float within the bounds, else ValueError saying what is wrong ("takes a whole
    number, got 'x'"): the one check behind number() (fab's untyped flags) and int_arg / float_arg (argparse)."""
    try:
        n = cast(value)
    except (TypeError, ValueError):
        raise ValueError(f"takes {'a whole number' if cast is int else 'a number'}, got {value!r}") from None
    if not math.isfinite(n):  # NaN would slip past every comparison below
        raise ValueError(f"takes a finite number, got {value!r}")
    if above is not None and n <= above:
        raise ValueError(f"must be {'positive' if above == 0 else f'more than {above:g}'}, got {value!r}")
    if minimum is not None and n < minimum:
        raise ValueError(f"must be at least {minimum}, got {value!r}")
    if maximum is not None and n > maximum:
        raise ValueError(f"must be at most {maximum}, got {value!r}")
    return n


def number(value, flag: str, cast=int, minimum: float | None = 0, maximum: float | None = None, above: float | None = None):
    """A command-line value as a number, or one line naming the flag (for CLIs, like fab's, that parse no types)."""
    try:
        return _number(value, cast, minimum, maximum, above)
    except ValueError as e:
        raise UserError(f"{flag} {e}") from None


def check_output_path(path, flag: str, *, directory: bool = False) -> None:
    """Refuse, before any work, an output that cannot be written where it is asked for: a part of the path that is
    a file rather than a directory, or a directory this user may not write in (a read-only mount, or its mode).
    `directory`: the output is a directory that files are written into, so it may exist already."""
    p = Path(path).absolute()
    if not directory and p.is_dir():
        raise UserError(f"{flag} {path} is a directory, not a file: choose a file's path for {flag}")
    # the nearest part that exists; what is missing gets created
    base = next(a for a in ([p] if directory else []) + list(p.parents) if a.exists())
    if not base.is_dir():
        raise UserError(f"{flag} {path}: {base} is a file, not a directory: choose another {flag}")
    if not os.access(base, os.W_OK | os.X_OK):
        if os.statvfs(base).f_flag & os.ST_RDONLY:
            raise UserError(f"{flag} {path}: {base} is on a read-only file system: choose a writable {flag}")
        raise UserError(f"{flag} {path}: this user (uid {os.getuid()}) may not write in {base}: fix its owner or mode, "
                        f"or choose another {flag}")


def http_url(url: str, what: str, fix: str) -> str:
    """`url` if it is an http(s) URL with a host (and a valid port), else one line: `what` names it, `fix` says what to pass."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (reading the port is what checks it)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in url):
        raise UserError(f"{what} {url!r} is not an http(s) URL: {fix}")
    return url


class ArgumentParser(argparse.ArgumentParser):
    """argparse under the project's error contract: a usage mistake (unknown flag, missing or malformed value) is one
    `error:` line naming the problem and pointing at --help, exit status 2, instead of argparse's usage block."""

    def __init__(self, *args, raises: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.raises = raises  # raise the UserError instead (a caller that parses another program's flags says whose)

    def error(self, message):
        if self.raises:
            raise UserError(f"{message} (see `{self.prog} --help`)")
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"error: {message} (see `{self.prog} --help`)", file=sys.stderr, flush=True)
        sys.exit(UserError.exit_code)


def _arg_type(cast, minimum, maximum, above=None):
    def convert(text: str):
        try:
            return _number(text, cast, minimum, maximum, above)
        except ValueError as e:  # argparse prefixes the flag: "argument --num: must be at least 1, got '0'"
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = cast.__name__
    return convert


def int_arg(minimum: int | None = None, maximum: int | None = None):
    """An argparse `type`: a whole number in [minimum, maximum]; a bad value is the parser's one `error:` line."""
    return _arg_type(int, minimum, maximum)


def float_arg(minimum: float | None = None, maximum: float | None = None, *, above: float | None = None):
    """An argparse `type`: a finite number in [minimum, maximum] (and > `above`); NaN and inf are refused."""
    return _arg_type(float, minimum, maximum, above)
