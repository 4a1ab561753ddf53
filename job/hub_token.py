"""This machine's Hugging Face token where huggingface_hub looks for it: HF_TOKEN, else the token file (HF_TOKEN_PATH,
else $HF_HOME/token, else ~/.cache/huggingface/token), read without the library. A token that cannot be sent in an
HTTP header (the file is a directory, binary or not ASCII) is one line here, before any connection: the launcher
reads it before it connects to a box, job.prepare before its first request to the hub."""

from __future__ import annotations

import os
from pathlib import Path

from job.errors import UserError


def token_path() -> Path:
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(os.environ.get("HF_TOKEN_PATH") or os.path.join(home, "token")).expanduser()


def _refuse(what: str, problem: str, fix: str) -> UserError:
    return UserError(f"{what} {problem}: a Hugging Face token is one line of ASCII (hf_...): {fix}")


def hf_token() -> str | None:
    """The token, None without one (downloads are then anonymous), or one line saying why it cannot be used. The
    token itself is never in the line."""
    token = os.environ.get("HF_TOKEN", "").strip()
    if token:
        return _checked(token, "HF_TOKEN", "set HF_TOKEN to the token itself, or unset it")
    path = token_path()
    if os.environ.get("HF_TOKEN_PATH"):
        what, fix = f"HF_TOKEN_PATH={path}", "point HF_TOKEN_PATH at the file `hf auth login` writes, or unset it"
    else:
        what, fix = f"the Hugging Face token file {path}", "run `hf auth login` to write it again, or delete it to download anonymously"
    try:
        text = path.read_bytes().decode("utf-8").strip()
    except IsADirectoryError:
        raise _refuse(what, "is a directory, not a file", fix) from None
    except PermissionError:
        raise UserError(f"{what} cannot be read by this user (uid {os.getuid()}): fix its owner or mode, or {fix}") from None
    except UnicodeDecodeError:
        raise _refuse(what, "holds binary bytes, not text", fix) from None
    except OSError:
        return None  # no token file: anonymous
    return _checked(text, what, fix) if text else None


def _checked(token: str, what: str, fix: str) -> str:
    for i, c in enumerate(token):
        if not c.isascii():
            raise _refuse(what, f"holds a character that is not ASCII (at position {i + 1})", fix)
        if not c.isprintable() or c.isspace():
            raise _refuse(what, f"holds more than one word or line (a space or control character at position {i + 1})", fix)
    return token
