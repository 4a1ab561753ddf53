"""User-facing errors: one clear line and a non-zero exit, never a traceback for a user mistake."""

from __future__ import annotations

import functools
import os
import sys

from job.fsutil import NO_SPACE


class UserError(Exception):
    """A mistake the user can fix; the message names the problem and the fix."""

    exit_code = 2


class TrainingDiverged(UserError):
    """The loss or the weights stopped being finite numbers; the run stopped without saving them."""

    exit_code = 3


def cli_main(fn):
    """Wrap a CLI entry point so UserError prints `error: ...` on stderr and exits non-zero."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            # Under torchrun every process hits the same mistake: one line per machine is enough.
            if os.environ.get("LOCAL_RANK", "0") == "0":
                print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(e.exit_code)
        except OSError as e:
            if e.errno not in NO_SPACE:
                raise
            # Writers that know their files say more (the checkpoint and shard writers do); this is the rest.
            where = f" writing {e.filename}" if e.filename else ""
            print(f"error: no space left on the device{where}: make room there (or write to another disk), then run the "
                  "same command again", file=sys.stderr, flush=True)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper


def number(value, flag: str, cast=int, minimum: float | None = 0):
    """A command-line value as a number, or one line naming the flag (for CLIs, like fab's, that parse no types)."""
    try:
        n = cast(value)
    except (TypeError, ValueError):
        raise UserError(f"{flag} takes {'a whole number' if cast is int else 'a number'}, got {value!r}") from None
    if minimum is not None and n < minimum:
        raise UserError(f"{flag} must be at least {minimum}, got {value!r}")
    return n
