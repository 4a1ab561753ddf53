"""User-facing errors: one clear line and a non-zero exit, never a traceback for a user mistake."""

from __future__ import annotations

import functools
import os
import sys


class UserError(Exception):
    """A mistake the user can fix; the message names the problem and the fix."""

    exit_code = 2


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
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
