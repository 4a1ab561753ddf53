"""torch.compile's cache that outlives the box: Inductor's own cache directory (its FX graphs, AOTAutograd entries and
Triton kernels, through TORCHINDUCTOR_CACHE_DIR), one directory per key on the persistent file system.

The key is what makes a compiled graph valid elsewhere: torch's and CUDA's versions, the GPU model ("cpu" or "mps"
off CUDA), the recipe and the code (job/'s content hash, job.identity). Inductor keys its entries by graph, not by
these, and a kernel built for another GPU or torch is at best a miss and at worst a crash; one directory per key keeps
each set apart, and the next run with the same key, on any box that mounts the file system, loads it.

Each directory records its key in key.json. One whose key.json is missing (with files beside it), unreadable or
names another key is never loaded: one line says why, it is moved aside and removed, and the run compiles afresh
into a new one. A TORCHINDUCTOR_CACHE_DIR set by the user wins and is used as it is.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
from pathlib import Path

from job import contract

ENV = "TORCHINDUCTOR_CACHE_DIR"
ROOT_ENV = "NANOGPT_COMPILE_CACHE"  # the root of the keyed directories, in place of contract.COMPILE_CACHE_ROOT
KEY_FILE = "key.json"


def cache_key(recipe: str, device: str) -> dict:
    """The key of a run of `recipe` on `device` (a torch device string) with this torch and this code."""
    import torch

    from job.identity import code_identity

    if device.startswith("cuda"):
        gpu = torch.cuda.get_device_name(torch.device(device))
    else:
        gpu = device.split(":")[0]  # "cpu", "mps"
    key = {"torch": str(torch.__version__), "cuda": torch.version.cuda, "gpu": gpu, "recipe": recipe, "code": code_identity()["code_sha256"]}
    if gpu == "cpu":
        # Inductor generates C++ for the CPU's vector ISA, and its graph cache's key leaves that ISA out: a graph made for
        # AVX2 and built for AVX-512 writes past its buffers. CPUs of different ISAs keep caches of their own.
        key["cpu_isa"] = torch.backends.cpu.get_cpu_capability()
    return key


def dir_name(key: dict) -> str:
    """A readable name with a hash of the whole key: recipe-torch-gpu-HASH."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9.-]+", "_", f"{key['recipe']}-torch{key['torch']}-{key['gpu']}")
    return f"{slug}-{digest}"


def root_for(log_dir: str) -> Path:
    """Where the keyed directories live: the persistent file system where it is mounted (the container), else the
    log dir (a laptop, the tests); NANOGPT_COMPILE_CACHE names another root."""
    if os.environ.get(ROOT_ENV):
        return Path(os.environ[ROOT_ENV])
    persistent = Path(contract.PERSISTENT)
    if persistent.is_dir() and os.access(persistent, os.W_OK):
        return Path(contract.COMPILE_CACHE_ROOT)
    return Path(log_dir) / contract.COMPILE_CACHE_DIR


def why_not(path: Path, key: dict) -> str | None:
    """Why the directory at `path` must not be loaded for `key`, or None when it may (or does not exist yet)."""
    if not path.is_dir():
        return None
    try:
        recorded = json.loads((path / KEY_FILE).read_text())
    except FileNotFoundError:
        try:
            return None if not any(path.iterdir()) else f"it records no key ({KEY_FILE} is missing)"
        except FileNotFoundError:  # moved aside meanwhile by another rank, which replaces it or puts it back
            return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"its {KEY_FILE} is unreadable ({type(e).__name__})"
    if not isinstance(recorded, dict):
        return f"its {KEY_FILE} is unreadable (not an object)"
    diff = [f"{k} {recorded.get(k)!r}, this run {key[k]!r}" for k in key if recorded.get(k) != key[k]]
    return f"it was made for another key ({'; '.join(diff)})" if diff else None


def _write_key(path: Path, key: dict) -> None:
    """Give `path` its key, so that no rank looking meanwhile ever sees the directory without it (it would move the
    directory aside as keyless from under this one): a new directory is made beside `path` with its key and renamed
    into place in one step; one that exists already (empty: made by hand) gets the key written beside it, renamed in.
    Other ranks may move the directory aside and back meanwhile (prepare): each step is tried again until it holds."""
    token = f"{os.getpid()}.{secrets.token_hex(4)}"  # one per writer, on any box
    text = json.dumps(key, indent=1, sort_keys=True) + "\n"
    while not (path / KEY_FILE).is_file():
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "a file where the compile cache's directory goes", str(path))
        if not path.is_dir():
            new = path.parent / f".{path.name}.{token}"
            new.mkdir(parents=True)
            (new / KEY_FILE).write_text(text)
            try:
                os.rename(new, path)
            except OSError as e:
                shutil.rmtree(new, ignore_errors=True)
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                # another rank's directory landed first: the loop checks that it has its key
        else:
            tmp = path.parent / f".{path.name}.{KEY_FILE}.{token}"
            tmp.write_text(text)
            try:
                os.replace(tmp, path / KEY_FILE)
            except FileNotFoundError:  # the directory was moved aside meanwhile: again
                tmp.unlink(missing_ok=True)


def prepare(root: Path, key: dict, say=print) -> Path:
    """The directory for `key` under `root`, made ready: created with its key, or checked and kept, or (stale,
    foreign or corrupt) moved aside, removed with one line, and made anew. Ranks that start together may all call
    this: the move aside is one rename, which only one of them wins, and a rank that finds it has moved the new
    directory another rank made meanwhile puts it back."""
    path = root / dir_name(key)
    reason = why_not(path, key)
    if reason is not None:
        aside = path.with_name(f"{path.name}.ignored-{os.getpid()}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            pass  # another rank moved it first and says so
        else:
            if why_not(aside, key) is not None:
                say(f"compile cache {path} ignored, not loaded: {reason}; compiling afresh into a new one", flush=True)
                shutil.rmtree(aside, ignore_errors=True)
            else:  # the new one another rank made between the look and the move (and said why): back it goes
                try:
                    os.rename(aside, path)
                except OSError:  # yet another rank has made one there, which is used
                    shutil.rmtree(aside, ignore_errors=True)
    _write_key(path, key)
    return path


def use(log_dir: str, recipe: str, device: str, user_dir: str | None = None) -> str:
    """Point Inductor at this run's cache directory before anything compiles; the path. A directory the user set wins:
    `user_dir`, the value of TORCHINDUCTOR_CACHE_DIR that the caller read at its start ("" where it was unset: torch sets
    the variable to its default when it first looks), else the variable's value now."""
    user_dir = user_dir if user_dir is not None else os.environ.get(ENV)
    if user_dir:
        os.environ[ENV] = user_dir
    else:
        os.environ[ENV] = str(prepare(root_for(log_dir), cache_key(recipe, device)).absolute())
    return os.environ[ENV]
