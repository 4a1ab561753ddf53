"""Every entry point under one error contract: a user's mistake is exactly one non-empty stderr line, starting with
`error:` and naming what was wrong, exit status 2, no traceback, and the files given as inputs left as they were.

The cases are generated: entry point x flag x kind of bad value (non-numbers, NaN and inf, out-of-range numbers,
paths under a regular file or in a read-only place, malformed URLs, hosts and ports, open quotes, unknown flags,
missing arguments, bad shards and bad checkpoints). Each runs the real command line as a process of its own. A Python
entry point's (`python -m job.X`, `python scripts/Y.py`, `fab`) is a child forked from a server that has already
imported what the entry points import (tests/forkserver.py): the child takes the case's argv, working directory and
environment, runs the entry point as the interpreter would run that command line, and exits as it would, so the exit
status, stdout and stderr checked here, a traceback included, are the command line's own; only the interpreter's
start-up and the imports are not paid again (a few hundredths of a second a case instead of a tenth to a few
seconds). `make`, and a case whose environment changes a variable that a preloaded module read while it was imported,
run in a subprocess; BAD_INPUTS_SUBPROCESS=1 runs every case in a subprocess, as a shell would, with the same
outcomes. Most fail in argument parsing, before torch is imported; the few that must read a shard or a checkpoint are
kept few.
No case reaches the network: hosts fail validation before any lookup, and anything that would connect is pointed
at a port on 127.0.0.1 that this test holds closed.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, env
from forkserver import ForkServer, run_process

PY = sys.executable
FAB = str(Path(sys.executable).parent / "fab")


# --- the files the bad inputs point at -------------------------------------------------------------------------------

def _closed_port():
    """A port on 127.0.0.1 that refuses connections for as long as the socket lives (bound, never listening)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s


def _listening_port():
    """A port on 127.0.0.1 that a server holds (listening, never answering): taken, for whatever would serve on it."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def _read_only_dir(d: Path):
    """A directory nobody may write in. root ignores mode bits, so for root it is a read-only tmpfs mount."""
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        return d, lambda: d.chmod(0o755)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(d)], capture_output=True, text=True)
    if proc.returncode != 0:
        return None, lambda: None
    return d, lambda: subprocess.run(["umount", "-l", str(d)], check=False)


def _checkpoints(w: Path) -> None:
    """A tiny real checkpoint, and the ways a file given as one can be wrong."""
    import torch

    from job.model import GPT, GPTConfig

    cfg = dict(block_size=16, vocab_size=64, n_layer=1, n_head=1, n_embd=8)  # small files: hashed before and after each case
    good = {"model": GPT(GPTConfig(**cfg)).state_dict(), "config": cfg, "step": 1}
    torch.save(good, w / "good.pt")
    data = (w / "good.pt").read_bytes()
    (w / "truncated.pt").write_bytes(data[: len(data) // 2])
    torch.save({"weights": 1}, w / "foreign.pt")
    torch.save(torch.zeros(3), w / "tensor.pt")
    torch.save(dict(good, config=dict(cfg, n_layer=2)), w / "wrong_model.pt")
    # the trainer's entries, edited by hand or written by another program
    torch.save(dict(good, step="5"), w / "text_step.pt")
    torch.save(dict(good, train_config=[1]), w / "list_settings.pt")
    torch.save(dict(good, identity="abc"), w / "text_identity.pt")
    torch.save(dict(good, model={k: torch.full_like(v, float("nan")) for k, v in good["model"].items()}), w / "nan_weights.pt")


def _shards(w: Path) -> None:
    """A data dir per way a shard can be wrong (each also holds a good val shard), and a good one."""
    good = np.arange(1000, 1000 + 4000, dtype=np.uint16)
    bad = {
        "good": good,  # for the cases whose mistake is elsewhere
        "oov": np.full(4000, 60000, dtype=np.uint16),  # ids outside GPT-2's vocabulary
        "dtype": np.arange(4000, dtype=np.int32),
    }
    for name, arr in bad.items():
        d = w / f"shards_{name}"
        d.mkdir()
        np.save(d / "x_val_000000.npy", good)
        np.save(d / "x_train_000001.npy", arr)
    d = w / "shards_truncated"
    d.mkdir()
    np.save(d / "x_val_000000.npy", good)
    np.save(d / "x_train_000001.npy", good)
    whole = (d / "x_train_000001.npy").read_bytes()
    (d / "x_train_000001.npy").write_bytes(whole[: len(whole) // 2])


# Code of the record's shape (the classes, arguments, op and schedule the speedrun scripts take from it), which is not
# the record's: another record, or an edited copy.
RECORD_SHAPED = """import torch
@torch.library.custom_op("nanogpt::mm", mutates_args=())
def mm_op(x, w, x_s, w_s, grad_s):
    return x
class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr=0.02, momentum=0.95, rank=0, world_size=1):
        pass
class GPT(torch.nn.Module):
    def __init__(self, vocab_size, num_layers, num_heads, model_dim, max_seq_len):
        pass
# int main
# learning rate schedule
def get_lr(step):
    return 1.0
def get_window_size_blocks(step):
    return 1
model: nn.Module = torch.compile(model)
"""


def _hf_dirs(w: Path) -> None:
    """A Hugging Face GPT-2 directory of another shape than the trainer's cases (--init-from reads its config first)."""
    import json

    (w / "hf_other").mkdir()
    (w / "hf_other" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 16,
                                                            "n_positions": 8, "vocab_size": 50257}))
    (w / "hf_other" / "model.safetensors").write_bytes(b"")
    # of the trainer cases' shape, with files that are not what they say
    fits = {"model_type": "gpt2", "n_layer": 1, "n_head": 1, "n_embd": 8, "n_positions": 16, "vocab_size": 50257}
    for name, weights, config in (("hf_garbage", "model.safetensors", fits), ("hf_garbage_bin", "pytorch_model.bin", fits),
                                  ("hf_list", "model.safetensors", [1]), ("hf_text_eps", "model.safetensors", dict(fits, layer_norm_epsilon="x"))):
        (w / name).mkdir()
        (w / name / "config.json").write_text(json.dumps(config))
        (w / name / weights).write_bytes(b"not weights at all")


def _not_records(w: Path) -> None:
    """Files given as the speedrun record that are not it: empty, not Python, of the record's shape but not its code."""
    (w / "empty.py").write_text("")
    (w / "syntax_error.py").write_text("import os\nclass GPT(nn.Module):\n    def __init__(self:\n# int main\n")
    (w / "record_shaped.py").write_text(RECORD_SHAPED)
    (w / "a_dir").mkdir()
    (w / "binary.txt").write_bytes(b"\xff\xfe\x00\x81 not a record")


def _hf_tokens(w: Path) -> None:
    """Hugging Face token files that cannot be one: a directory, binary bytes, text outside ASCII."""
    (w / "hf_token_dir").mkdir()
    (w / "hf_token_binary").write_bytes(b"\xff\xfe\x00\x81hf")
    (w / "hf_token_accent").write_text("hf_caf\u00e9\n", encoding="utf-8")


def _prepared(w: Path) -> None:
    """Prepared directories the way a hand edit or a partial copy leaves them: manifests missing a key, train shards
    without a val shard, a finished manifest that lists no shards."""
    import json

    (w / "many.txt").write_text("".join(f"line {i} of a text long enough for a few shards\n" for i in range(200)))
    for name, edit in (("prep_no_complete", lambda m: m.pop("complete")),
                       ("prep_no_tokens", lambda m: m["shards"][1].pop("tokens"))):
        subprocess.run([PY, "-m", "job.prepare", "text", str(w / "many.txt"), "--out", str(w / name), "--shard-size", "400",
                        "--workers", "1"], cwd=ROOT, env=env(), check=True, capture_output=True)
        manifest = json.loads((w / name / "manifest.json").read_text())
        edit(manifest)
        (w / name / "manifest.json").write_text(json.dumps(manifest))
    d = w / "train_only"
    d.mkdir()
    np.save(d / "x_train_000001.npy", np.arange(1000, 1400, dtype=np.uint16))
    d = w / "no_shards"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"version": 1, "identity": {"source": "text", "shard_size": 400}, "complete": True,
                                                 "units": [], "tokens": 0, "documents": 0, "shards": []}))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = tmp_path_factory.mktemp("inputs")
    (w / "afile").write_text("a regular file\n")
    (w / "log").mkdir()
    (w / "log" / "metrics.jsonl").write_text('{"event": "train", "step": 1, "loss": 10.5}\n{"event": "val", "step": 1, "loss": 10.9}\n')
    (w / "empty.jsonl").write_text("\n")
    (w / "edited_log").mkdir()
    (w / "edited_log" / "metrics.jsonl").write_text('{"event": "start", "step": 0, "config": {"seed": 1}}\n{"event": "train", "step": 1, '
                                                    '"loss": 10.5, "ms": 5}\n{"event": "val", "step": 1, "loss": "low"}\n'
                                                    '{"event": "end", "step": 1, "reason": "done"}\n')
    (w / "bench.json").write_text("{not json")
    (w / "prev_export").mkdir()
    (w / "prev_export" / "config.json").write_text("{}\n")
    (w / "busy").mkdir()
    (w / "busy" / "notes.txt").write_text("mine\n")
    (w / "api_key").write_text("secret-test-key\n")
    (w / "api_key").chmod(0o600)
    (w / "api_key_binary").write_bytes(b"\xff\xfe\x81key\n")
    (w / "api_key_binary").chmod(0o600)
    (w / "doc.txt").write_text("some text\n")
    (w / "tb").mkdir()
    (w / "tb" / "events.out.tfevents.1.host.1.0").write_bytes(b"")  # make dashboard looks for the name only
    _checkpoints(w)
    _shards(w)
    _hf_tokens(w)
    _prepared(w)
    _not_records(w)
    _hf_dirs(w)
    ro, release = _read_only_dir(w / "ro")
    port = _closed_port()
    taken = _listening_port()
    # outputs a command may create before it meets the bad input (a trainer's log dir): not among the inputs
    scratch = tmp_path_factory.mktemp("scratch")
    yield {"dir": w, "ro": ro, "port": port.getsockname()[1], "taken": taken.getsockname()[1], "scratch": scratch}
    port.close()
    taken.close()
    release()


def fingerprint(root: Path) -> dict:
    """Every path under root with its type, mode and contents' digest: what a failed command must leave alone."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            out[str(p.relative_to(root))] = (st.st_mode, digest)
    return out


# --- the cases -------------------------------------------------------------------------------------------------------
# Placeholders in argv: {w} the input dir, {ro} the read-only dir, {port} the closed port, {taken} a port a server holds.

BAD_INT = ["abc", "1.5", "nan", "-1"]
BAD_POSITIVE = [*BAD_INT, "0"]
BAD_FLOAT = ["abc", "nan", "inf", "-inf", "-1"]
BAD_POSITIVE_FLOAT = [*BAD_FLOAT, "0"]
UNDER_FILE = "{w}/afile/sub"  # a path whose parent is a regular file
BAD_HOSTS = ["user@", "@203.0.113.7", "u@h:99999", "u@h:0", "u@h:port", "h;touch x", "ho st", "-oProxyCommand=sh", "999.1.1.1",
             "h..", "u s@h"]
BAD_URLS = ["ftp://example.org", "localhost:8080", "http://", "http://h:99999", "https://h/a b", "http://[::1"]
OPEN_QUOTES = ["--max-lr '3e-4", '--log-dir "x', "--seed \\"]


CASE_ENV: dict[str, dict] = {}  # a case's environment, by its id (placeholders filled as in argv; None unsets)


def env_case(argv: list[str], needle, case_id: str, **extra_env):
    """A case whose mistake is in the environment, not on the command line."""
    CASE_ENV[case_id] = extra_env
    return pytest.param(argv, needle, id=case_id)


TORCH_CASES: set[str] = set()  # the ids of the cases whose command line imports torch


def torch_cases(cases: list) -> list:
    """Cases whose command line imports torch (a second or two): they fork from a server that has it loaded."""
    TORCH_CASES.update(c.id for c in cases)
    return cases


def flag_cases(prefix: list[str], base: list[str], flag: str, values: list[str], tag: str) -> list:
    """The line must name the flag, or quote the value it refuses."""
    return [pytest.param([*prefix, *base, flag, v], (flag, repr(v)), id=f"{tag}{flag}={v}") for v in values]


def sample_cases() -> list:
    cmd, base = [PY, "-m", "job.sample"], ["--checkpoint", "{w}/missing.pt"]
    cases = [
        *flag_cases(cmd, base, "--num", [*BAD_POSITIVE, "100000"], "sample"),
        *flag_cases(cmd, base, "--max-tokens", [*BAD_POSITIVE, "10000000"], "sample"),
        *flag_cases(cmd, base, "--top-k", BAD_POSITIVE, "sample"),
        *flag_cases(cmd, base, "--temperature", BAD_POSITIVE_FLOAT, "sample"),
        *flag_cases(cmd, base, "--seed", ["abc", "-1", str(2**64)], "sample"),
        *flag_cases(cmd, base, "--device", ["gpu", "cuda:x", ""], "sample"),
        pytest.param([*cmd], "--checkpoint", id="sample-missing--checkpoint"),
        pytest.param([*cmd, *base, "--bogus"], "--bogus", id="sample-unknown-flag"),
        pytest.param([*cmd, "--checkpoint", "{w}/missing.pt", "--prompt", ""], "prompt", id="sample-empty-prompt"),
    ]
    for kind in ("missing.pt", "afile/sub.pt"):
        cases.append(pytest.param([*cmd, "--checkpoint", f"{{w}}/{kind}"], kind.split("/")[0], id=f"sample--checkpoint={kind}"))
    return cases


def export_cases() -> list:
    cmd, ckpt = [PY, "-m", "job.export"], ["--checkpoint", "{w}/missing.pt"]
    return [
        pytest.param([*cmd, *ckpt, "--out", "{w}/o", "--dtype", "int8"], "--dtype", id="export--dtype=int8"),
        pytest.param([*cmd, *ckpt, "--out", UNDER_FILE], "--out", id="export--out=under-a-file"),
        pytest.param([*cmd, *ckpt, "--out", "{w}/afile"], "--out", id="export--out=a-file"),
        pytest.param([*cmd, *ckpt, "--out", "{ro}/export"], "--out", id="export--out=read-only"),
        pytest.param([*cmd, *ckpt, "--out", "{w}/prev_export"], "--overwrite", id="export--out=earlier-export"),
        pytest.param([*cmd, *ckpt], "--out", id="export-missing--out"),
        pytest.param([*cmd, "--out", "{w}/o"], "--checkpoint", id="export-missing--checkpoint"),
        pytest.param([*cmd, *ckpt, "--out", "{w}/o", "--bogus"], "--bogus", id="export-unknown-flag"),
        pytest.param([*cmd, "--checkpoint", "{w}/missing.pt", "--out", "{w}/o"], "missing.pt", id="export--checkpoint=missing"),
    ]


def plot_cases() -> list:
    cmd, log = [PY, "-m", "job.plot"], ["{w}/log"]
    return [
        *flag_cases(cmd, log, "--smooth", ["abc", "1.5", "-1"], "plot"),
        *flag_cases(cmd, log, "--tokens-per-step", BAD_POSITIVE, "plot"),
        *flag_cases(cmd, log, "--out", [UNDER_FILE + ".png", "{ro}/plot.png", "{w}/plot.jpg", "{w}/log"], "plot"),
        pytest.param([*cmd], "logdir", id="plot-missing-logdir"),
        pytest.param([*cmd, "{w}/nothing"], "nothing", id="plot-logdir=missing"),
        pytest.param([*cmd, UNDER_FILE], "afile", id="plot-logdir=under-a-file"),
        pytest.param([*cmd, "{w}/empty.jsonl"], "nothing to plot", id="plot-logdir=empty-log"),
        pytest.param([*cmd, *log, "--bogus"], "--bogus", id="plot-unknown-flag"),
    ]


def stats_cases() -> list:
    cmd, log = [PY, "-m", "job.stats"], ["{w}/log"]
    return [
        *flag_cases(cmd, log, "--target", BAD_POSITIVE_FLOAT, "stats"),
        pytest.param([*cmd], "logdir", id="stats-missing-logdir"),
        pytest.param([*cmd, "{w}/nothing"], "nothing", id="stats-logdir=missing"),
        pytest.param([*cmd, UNDER_FILE], "afile", id="stats-logdir=under-a-file"),
        pytest.param([*cmd, "{w}/busy"], "has no metrics.jsonl", id="stats-logdir=no-metrics"),
        pytest.param([*cmd, *log], "no finished run", id="stats-logdir=unfinished-run"),
        pytest.param([*cmd, "{w}/edited_log"], "has an event the trainer did not write", id="stats-logdir=edited-events"),
        pytest.param([*cmd, *log, "--bogus"], "--bogus", id="stats-unknown-flag"),
    ]


def prepare_cases() -> list:
    cmd = [PY, "-m", "job.prepare"]
    text = [*cmd, "text", "{w}/doc.txt", "--out"]
    return [
        pytest.param([*text, UNDER_FILE], "afile", id="prepare--out=under-a-file"),
        pytest.param([*text, "{ro}/shards"], "ro", id="prepare--out=read-only"),
        pytest.param([*text, "{w}/o", "--shard-size", "0"], "--shard-size", id="prepare--shard-size=0"),
        pytest.param([*text, "{w}/o", "--workers", "0"], "--workers", id="prepare--workers=0"),
        pytest.param([*cmd, "text", "{w}/nothing.txt", "--out", "{w}/o"], "nothing.txt", id="prepare-input=missing"),
        pytest.param([*cmd, "verify", "{w}/nothing"], "nothing", id="prepare-verify=missing"),
        pytest.param([*text, "{w}/o", "--shard-size", "abc"], "--shard-size", id="prepare--shard-size=abc"),
        pytest.param([*cmd], "source", id="prepare-missing-source"),
        pytest.param([*cmd, "text", "{w}/doc.txt"], "--out", id="prepare-missing--out"),
        pytest.param([*cmd, "verify", "{w}", "--bogus"], "--bogus", id="prepare-unknown-flag"),
        pytest.param([*cmd, "text", "{w}/many.txt", "--out", "{ro}", "--shard-size", "400"], "read-only", id="prepare--out=read-only-dir"),
        pytest.param([*cmd, "verify", "{w}/prep_no_complete"], "'complete'", id="prepare-verify-manifest-without-complete"),
        pytest.param([*cmd, "verify", "{w}/prep_no_tokens"], "'tokens'", id="prepare-verify-manifest-entry-without-tokens"),
        pytest.param([*cmd, "text", "{w}/many.txt", "--out", "{w}/prep_no_complete", "--shard-size", "400", "--workers", "1"],
                     "'complete'", id="prepare-resume-manifest-without-complete"),
        pytest.param([*cmd, "text", "{w}/many.txt", "--out", "{w}/prep_no_tokens", "--shard-size", "400", "--workers", "1"],
                     "'tokens'", id="prepare-resume-manifest-entry-without-tokens"),
        pytest.param([*cmd, "verify", "{w}/train_only"], "no val shard", id="prepare-verify-train-shards-without-val"),
        pytest.param([*cmd, "verify", "{w}/no_shards"], "lists no shards", id="prepare-verify-manifest-without-shards"),
    ]


def hub_cases() -> list:
    """Downloads refused before any connection: the hub's settings in the environment, a read-only --out."""
    hub = [PY, "-m", "job.prepare", "fineweb-gpt2", "--out"]
    closed = {"HF_ENDPOINT": "http://127.0.0.1:{port}", "HF_TOKEN": ""}
    cases = [
        env_case([*hub, "{scratch}/hub"], "HF_ENDPOINT", "prepare-HF_ENDPOINT=port-out-of-range", HF_ENDPOINT="http://127.0.0.1:99999"),
        env_case([*hub, "{scratch}/hub"], "HF_ENDPOINT", "prepare-HF_ENDPOINT=no-scheme", HF_ENDPOINT="127.0.0.1:{port}"),
        env_case([*hub, "{ro}"], "read-only", "prepare-fineweb-gpt2--out=read-only-dir", **closed),
    ]
    for kind in ("dir", "binary", "accent"):
        cases.append(env_case([*hub, "{scratch}/hub"], "HF_TOKEN_PATH", f"prepare-HF_TOKEN_PATH={kind}",
                              HF_TOKEN_PATH=f"{{w}}/hf_token_{kind}", **closed))
        cases.append(env_case([FAB, "launch", "--host", "127.0.0.1:{port}"], "HF_TOKEN_PATH", f"fab-launch-HF_TOKEN_PATH={kind}",
                              HF_TOKEN_PATH=f"{{w}}/hf_token_{kind}", HF_TOKEN=""))
    return cases


def guard_sync_cases() -> list:
    guard = [PY, "-m", "job.sidecar.guard", "--instance-id", "i-1", "--api-key-file", "{w}/api_key", "--api-base", "http://127.0.0.1:{port}"]
    sync = [PY, "-m", "job.sidecar.sync", "--s3", "s3://bucket/prefix", "--log-dir", "{w}/log"]
    return [
        *flag_cases(guard, [], "--max-hours", BAD_POSITIVE_FLOAT, "guard"),
        *flag_cases(guard, [], "--poll-seconds", ["nan", "0", "-1"], "guard"),
        *flag_cases(guard, [], "--idle-minutes", ["inf", "-1"], "guard"),
        pytest.param([*guard, "--api-base", "ftp://x"], "ftp://x", id="guard--api-base=ftp"),
        pytest.param([*guard, "--s3", "bucket/prefix"], "bucket/prefix", id="guard--s3=no-scheme"),
        pytest.param([PY, "-m", "job.sidecar.guard", "--api-key-file", "{w}/api_key"], "--instance-id", id="guard-missing--instance-id"),
        *flag_cases(sync, [], "--interval", BAD_POSITIVE_FLOAT, "sync"),
        pytest.param([*sync, "--endpoint-url", "bogus"], "bogus", id="sync--endpoint-url=bogus"),
        pytest.param([*sync, "--log-dir", "{w}/afile"], "--log-dir", id="sync--log-dir=a-file"),
        pytest.param([PY, "-m", "job.sidecar.sync", "--s3", "bucket"], "bucket", id="sync--s3=no-scheme"),
        pytest.param([PY, "-m", "job.sidecar.sync"], "--s3", id="sync-missing--s3"),
    ]


# What is given as the speedrun record (the path, and what the line must say), each not the record's code.
NOT_RECORDS = [("{w}/a_dir", "is a directory"), ("{w}/missing.txt", "does not exist"), ("{w}/empty.py", "(it is empty)"),
               ("{w}/syntax_error.py", "line 3 is not Python"), (str(ROOT / "job" / "model.py"), "no `# int main` line"),
               ("{w}/good.pt", "not text"), ("{w}/record_shaped.py", "another version of the record's code")]
SPEEDRUN_SCRIPTS = ["speedrun_reference", "bench_speedrun", "speedrun_2026_07_17_check"]


def speedrun_script_cases(s) -> list:
    """scripts/speedrun_reference.py, bench_speedrun.py and speedrun_2026_07_17_check.py: the record's path and code,
    --out before the run, argparse. They import torch before parsing (seconds each): each kind once, the scripts in turn
    (the first two check with the same code, the third alike for its record)."""
    def cmd(name, record, out="{scratch}/speedrun.json"):
        return [*s(name), "--record", record, "--out", out, *(["--device", "cpu"] if name == "bench_speedrun" else [])]

    cases = [pytest.param(cmd(name, record), want, id=f"{name}--record={Path(record).name}")
             for name, (record, want) in rotate(NOT_RECORDS, SPEEDRUN_SCRIPTS)]
    # a file as --record: --out is refused before it is read, and before the run
    outs = [("{w}/busy", "busy is a directory"), (UNDER_FILE, "afile is a file"), ("{ro}/speedrun.json", "read-only")]
    cases += [pytest.param(cmd(name, "{w}/doc.txt", out), want, id=f"{name}--out={Path(out).name}")
              for name, (out, want) in rotate(outs, SPEEDRUN_SCRIPTS)]
    return cases + [
        pytest.param(cmd("speedrun_reference", "{w}/doc.txt") + ["--bogus"], "--bogus", id="speedrun_reference-unknown-flag"),
        *flag_cases(s("bench_speedrun"), ["--record", "{w}/doc.txt"], "--steps", ["0", "abc"], "bench_speedrun"),
        *flag_cases(s("bench_speedrun"), ["--record", "{w}/doc.txt"], "--size", ["huge"], "bench_speedrun"),
        *flag_cases(s("speedrun_2026_07_17_check"), ["--record", "{w}/doc.txt"], "--seq-len", ["0", "abc"], "speedrun_2026_07_17_check"),
    ]


def script_cases() -> list:
    def s(name):
        return [PY, str(ROOT / "scripts" / f"{name}.py")]

    return [
        pytest.param(s("bench_summary"), "json", id="bench_summary-missing-files"),
        pytest.param([*s("bench_summary"), "{w}/nothing.json"], "nothing.json", id="bench_summary-file=missing"),
        pytest.param([*s("bench_summary"), "{w}/bench.json"], "bench.json", id="bench_summary-file=not-json"),
        pytest.param([*s("bench_summary"), UNDER_FILE], "afile", id="bench_summary-file=under-a-file"),
        *flag_cases(s("bench_prepare"), [], "--mb", ["abc", "nan", "0", "-1"], "bench_prepare"),
        *flag_cases(s("bench_prepare"), [], "--files", ["0", "abc"], "bench_prepare"),
        *flag_cases(s("bench_prepare"), [], "--repeat", ["0"], "bench_prepare"),
        *flag_cases(s("bench_image"), [], "--rounds", ["0", "x"], "bench_image"),
        *flag_cases(s("bench_prepare"), [], "--dir", [UNDER_FILE, "{ro}/bench", "{w}/busy"], "bench_prepare"),
        pytest.param([*s("estimate_cuda_image"), "--bogus"], "--bogus", id="estimate_cuda_image-unknown-flag"),
        *flag_cases(s("estimate_cuda_image"), [], "--torch", ["abc", "2.13.0; rm"], "estimate_cuda_image"),
        *flag_cases(s("bench_fetch"), [], "--rounds", ["0", "abc"], "bench_fetch"),
        *flag_cases(s("bench_fetch"), [], "--sets", ["abc"], "bench_fetch"),
        pytest.param([*s("bench_compile_cache"), "--recipes", "gpt2,bogus"], "no recipe bogus", id="bench_compile_cache--recipes=bogus"),
        pytest.param([*s("bench_compile_cache"), "--data", "{w}/nothing"], "--data", id="bench_compile_cache--data=missing"),
        *flag_cases(s("compare_recipes"), [], "--tokens", ["0", "-5", "abc", "nan"], "compare_recipes"),
        *flag_cases(s("compare_recipes"), [], "--out", [UNDER_FILE, "{ro}/cmp"], "compare_recipes"),
        *flag_cases(s("compare_recipes"), ["--out", "{w}/cmp"], "--json", [UNDER_FILE], "compare_recipes"),
        # these import torch before parsing: one case each
        *torch_cases([
            *speedrun_script_cases(s),
            pytest.param([*s("bench_train"), "--steps", "0"], "--steps", id="bench_train--steps=0"),
            pytest.param([*s("bench_loss"), "--rows", "abc"], "--rows", id="bench_loss--rows=abc"),
            pytest.param([*s("estimate_memory"), "--json", UNDER_FILE], "--json", id="estimate_memory--json=under-a-file"),
            pytest.param([*s("estimate_memory"), "--json", "{w}/busy"], "busy is a directory", id="estimate_memory--json=a-directory"),
            pytest.param([*s("speedrun_2026_07_17_check_optim"), "--record", "{w}/binary.txt"], "is not text",
                         id="speedrun_2026_07_17_check_optim--record=binary"),
        ]),
    ]


# make runs the recipe with this Python's virtualenv and never installs one (-o: its stamp counts as up to date).
MAKE = ["make", "--no-print-directory", "-C", str(ROOT), "-o", f"{sys.prefix}/.installed-stamp", f"VENV={sys.prefix}"]
BAD_PORTS = ["abc", "1.5", "nan", "-1", "70000", ""]


def make_cases() -> list:
    """make dashboard: LOGDIR and PORT are checked before TensorBoard starts."""
    dashboard = [*MAKE, "dashboard"]
    tb = [*dashboard, "LOGDIR={w}/tb"]
    return [
        *[pytest.param([*tb, f"PORT={v}"], ("PORT", repr(v)), id=f"make-dashboard-PORT={v}") for v in BAD_PORTS],
        pytest.param([*tb, "PORT={taken}"], "is taken", id="make-dashboard-PORT=taken"),
        pytest.param([*dashboard, "LOGDIR={w}/nothing"], "no TensorBoard event files", id="make-dashboard-LOGDIR=missing"),
        pytest.param([*dashboard, "LOGDIR={w}/log"], "no TensorBoard event files", id="make-dashboard-LOGDIR=no-event-files"),
        pytest.param([*dashboard, "LOGDIR={w}/afile"], "no TensorBoard event files", id="make-dashboard-LOGDIR=a-file"),
        pytest.param([*dashboard, "LOGDIR="], "no TensorBoard event files", id="make-dashboard-LOGDIR=empty"),
        # push-image: a registry path without a scheme, and an image that exists (build-image made it) before any push
        pytest.param([*MAKE, "push-image", "REGISTRY=https://127.0.0.1:5000/team"], "without a scheme", id="make-push-image-REGISTRY=url"),
        pytest.param([*MAKE, "push-image", "REGISTRY=127.0.0.1:5000/team", "NAME=nanogpt-no-such-image"], "make build-image",
                     id="make-push-image-no-image"),
    ]


SSH_TASKS = ["launch", "logs", "status", "stop", "fetch-weights", "dashboard"]
LAMBDA_TASKS = ["types", "instances", "provision", "terminate"]


def rotate(values: list[str], over: list[str]) -> list[tuple[str, str]]:
    """Each value once, against the targets in turn: every target meets several kinds and every kind is tried, for a
    fraction of the full product (each fab run pays a fraction of a second just to start)."""
    return [(over[i % len(over)], v) for i, v in enumerate(values)]


def fab_cases() -> list:
    fab, host = [FAB], ["--host", "127.0.0.1:{port}"]
    launch = [*fab, "launch", *host]
    cases = [pytest.param([*fab, task, "--host", bad], (bad, repr(bad)), id=f"fab-{task}--host={bad}")
             for task, bad in rotate(BAD_HOSTS, SSH_TASKS)]
    cases += [pytest.param([*fab, task, *host, "--port", v], ("--port", repr(v)), id=f"fab-{task}--port={v}")
              for task, v in rotate(["abc", "0", "70000", "nan", "-1"], SSH_TASKS)]
    cases += [pytest.param([*fab, task, "--api-base", url], repr(url), id=f"fab-{task}--api-base={url}")
              for task, url in rotate(BAD_URLS[:4], LAMBDA_TASKS)]
    cases += [pytest.param([*fab, task, *(host if task in SSH_TASKS else []), "--bogus"], "--bogus", id=f"fab-{task}-unknown-flag")
              for task in ("launch", "fetch-weights", "terminate")]
    cases += [
        *flag_cases(launch, [], "--steps", ["abc", "0"], "fab-launch"),
        *flag_cases(launch, [], "--nproc", ["1.5"], "fab-launch"),
        *flag_cases(launch, [], "--max-hours", ["nan", "-1"], "fab-launch"),
        *flag_cases(launch, [], "--guard-poll", ["0"], "fab-launch"),
        *flag_cases(launch, [], "--step-seconds", ["inf", "nan", "abc"], "fab-launch"),
        # a step time of 0 or less: the line says it must be positive (on the flag, before any pricing or dry run)
        *[pytest.param([*launch, *dry, "--step-seconds", v], "--step-seconds must be positive", id=f"fab-launch{''.join(dry)}--step-seconds={v}")
          for dry, v in rotate(["0", "-1", "0.0", "-0", "1e-400"], [[], ["--dry-run"], ["--dry-run", "--provision", "--type", "gpu_1x_a10"]])],
        *flag_cases(launch, [], "--master-port", ["70000"], "fab-launch"),
        *flag_cases(launch, [], "--train-args", OPEN_QUOTES, "fab-launch"),
        # what the trainer on the box would refuse, or fail on only after training (its samples at the end)
        pytest.param([*launch, "--train-args", f"--seed {2**64}"], "--seed", id="fab-launch--train-args=seed-past-64-bits"),
        pytest.param([*launch, "--train-args", "--sample-prompt ''"], "--sample-prompt", id="fab-launch--train-args=empty-prompt"),
        *flag_cases(launch, [], "--env", ['A="b', "NOVALUE", "1A=2", "A-B=1"], "fab-launch"),
        *flag_cases(launch, [], "--build-arg", ["'X=1", "X Y=1"], "fab-launch"),
        *flag_cases(launch, [], "--wheels", ["{w}/nothing", "{w}/busy"], "fab-launch"),
        *flag_cases(launch, [], "--api-base", BAD_URLS[4:], "fab-launch"),
        *flag_cases(launch, [], "--s3-endpoint", ["bogus"], "fab-launch"),
        *flag_cases(launch, [], "--sync-s3", ["bucket/prefix"], "fab-launch"),
        *flag_cases(launch, [], "--cuda", ["cu99", "11.8"], "fab-launch"),
        *flag_cases(launch, [], "--image", ["http://127.0.0.1:5000/team/nanogpt-train", "Team/Name", "reg/name@sha256:abc"], "fab-launch"),
        pytest.param([*launch, "--hosts", "127.0.0.1"], "--hosts", id="fab-launch--host-and--hosts"),
        pytest.param([*launch, "--key", "{w}/nokey"], "nokey", id="fab-launch--key=missing"),
        *flag_cases([*fab, "stop"], host, "--timeout", ["nan"], "fab-stop"),
        *flag_cases([*fab, "logs"], host, "--tail", ["abc"], "fab-logs"),
        *flag_cases([*fab, "dashboard"], host, "--local-port", ["abc", "70000"], "fab-dashboard"),
        *flag_cases([*fab, "dashboard"], host, "--remote-port", ["0"], "fab-dashboard"),
        *flag_cases([*fab, "fetch-weights"], host, "--to", [UNDER_FILE, "{ro}/weights"], "fab-fetch-weights"),
        *flag_cases([*fab, "fetch-weights"], host, "--s3", ["bucket/prefix"], "fab-fetch-weights"),
        *flag_cases([*fab, "provision"], [], "--ssh-port", ["70000"], "fab-provision"),
        *flag_cases([*fab, "provision"], [], "--timeout", ["nan"], "fab-provision"),
        *flag_cases([*fab, "provision"], [], "--poll", ["0"], "fab-provision"),
        pytest.param([*fab, "types", "--api-key-file", "{w}/nokey"], "nokey", id="fab-types--api-key-file=missing"),
        pytest.param([*fab, "types", "--api-key-file", "{w}/api_key_binary"], "api_key_binary holds a character",
                     id="fab-types--api-key-file=binary"),
        env_case([*fab, "instances"], "LAMBDA_API_KEY holds a character", "fab-instances-LAMBDA_API_KEY=not-ascii",
                 LAMBDA_API_KEY="key\u20ac"),
        pytest.param([*fab, "no-such-task"], "no-such-task", id="fab-unknown-task"),
        pytest.param([*fab, "launch", "--host"], "--host", id="fab-launch--host-without-value"),
        pytest.param([*fab, "status", *host, "yes"], "yes", id="fab-status-stray-word"),
        pytest.param([*fab, "--help", "no-such-task"], "no-such-task", id="fab--help-unknown-task"),
    ]
    return cases


def train_cases() -> list:
    """job.train imports torch before it parses (seconds each): the flags are job.config's own tests; here only what
    reaches the data, once per kind of bad shard."""
    cmd = [PY, "-m", "job.train", "--preset", "tiny", "--n-layer", "1", "--n-head", "1", "--n-embd", "8", "--block-size", "16",
           "--seq-len", "16", "--micro-batch", "2", "--total-batch-tokens", "32", "--max-steps", "1", "--sample-num", "0",
           "--hellaswag-every", "0", "--device", "cpu", "--compile", "off", "--resume", "never", "--log-dir", "{scratch}/trainlog"]
    cases = [pytest.param([*cmd, "--data-dir", f"{{w}}/shards_{kind}"], f"shards_{kind}", id=f"train-shard={kind}")
             for kind in ("oov", "dtype", "truncated")]
    cases.append(pytest.param([*cmd, "--data-dir", "{w}/shards_good", "--log-dir", UNDER_FILE], "afile", id="train--log-dir=under-a-file"))
    good = [*cmd, "--data-dir", "{w}/shards_good"]
    # a place no one may make a directory in: procfs answers mkdir with ENOENT, so the up-front check must say it
    cases.append(pytest.param([*good, "--log-dir", "/proc/1/nanogpt-log"], "--log-dir /proc/1/nanogpt-log", id="train--log-dir=under-proc"))
    # a model of another shape: every difference, and the flags that fit it (with the shorter sequences its block forces)
    cases.append(pytest.param([*good, "--init-from", "hf:{w}/hf_other"], "it has 8 positions, fewer than this run's block size 16: "
                              "pass --n-head 2 --n-embd 16 --block-size 8 --seq-len 8 --total-batch-tokens 16", id="train--init-from=other-shape"))
    for name, needle in (("hf_garbage", "model.safetensors cannot be read"), ("hf_garbage_bin", "pytorch_model.bin cannot be read"),
                         ("hf_list", "holds a JSON list"), ("hf_text_eps", "layer_norm_epsilon 'x'")):
        # each in a log dir of its own, which the refusal leaves without a file (the weights are read before the logs open)
        cases.append(pytest.param([*good, "--init-from", f"hf:{{w}}/{name}", "--log-dir", f"{{scratch}}/{name}-log"], needle,
                                  id=f"train--init-from={name}"))
    cases.append(env_case(good, "WORLD_SIZE", "train-WORLD_SIZE=two", WORLD_SIZE="two", RANK="0"))
    cases.append(env_case([*good, "--wandb", "proj"], "WANDB_MODE", "train-WANDB_MODE=bogus", WANDB_MODE="bogus"))
    cases.append(env_case([*good, "--wandb", "proj"], "WANDB_BASE_URL", "train-WANDB_BASE_URL=notaurl", WANDB_BASE_URL="notaurl"))
    cases.append(env_case([*good, "--total-batch-tokens", "64"], "MASTER_ADDR", "train-RANK-without-MASTER_ADDR",
                          RANK="0", WORLD_SIZE="2", LOCAL_RANK="0",
                          MASTER_ADDR=None, MASTER_PORT=None))
    # a head size the rotary embedding cannot split in quarters (120 / 4 = 30)
    speedrun = [PY, "-m", "job.train", "--recipe", "speedrun-2025-05-24", "--preset", "tiny", "--n-embd", "120", "--n-head", "4",
                "--seq-len", "128", "--val-seq-len", "128", "--block-size", "128", "--total-batch-tokens", "128", "--val-tokens", "256",
                "--max-steps", "1", "--device", "cpu", "--compile", "off", "--resume", "never", "--data-dir", "{w}/shards_good",
                "--log-dir", "{scratch}/speedrunlog"]
    cases.append(pytest.param(speedrun, "--n-head", id="train-speedrun-head-size-not-a-multiple-of-4"))
    return [*torch_cases(cases),
            pytest.param([FAB, "launch", "--host", "127.0.0.1:{port}", "--recipe", "speedrun-2025-05-24", "--preset", "tiny",
                          "--train-args", "--n-embd 120 --n-head 4"], "--n-head", id="fab-launch-speedrun-head-size-not-a-multiple-of-4")]


def checkpoint_cases() -> list:
    """Bad checkpoints through job.sample (job.export reads them with the same code: one case)."""
    cases = [pytest.param([PY, "-m", "job.sample", "--checkpoint", f"{{w}}/{kind}.pt", "--device", "cpu"], f"{kind}.pt",
                          id=f"sample--checkpoint={kind}")
             for kind in ("truncated", "foreign", "tensor", "wrong_model", "text_step", "list_settings", "text_identity", "nan_weights")]
    cases.append(pytest.param([PY, "-m", "job.export", "--checkpoint", "{w}/wrong_model.pt", "--out", "{w}/o"], "wrong_model.pt",
                              id="export--checkpoint=wrong_model"))
    return torch_cases(cases)


CASES = [*sample_cases(), *export_cases(), *plot_cases(), *stats_cases(), *prepare_cases(), *hub_cases(), *guard_sync_cases(), *script_cases(),
         *fab_cases(), *train_cases(), *checkpoint_cases(), *make_cases()]

NO_KEY = {"fab-types--api-key-file=missing", "fab-types--api-key-file=binary"}  # cases run without LAMBDA_API_KEY


def base_env(world: dict) -> dict:
    # Nothing may reach a real service: the Lambda API and S3 point at the closed port, and a key is at hand so the
    # Lambda tasks get as far as their own checks.
    closed = f"http://127.0.0.1:{world['port']}"
    e = env(**{"LAMBDA_API_BASE": closed, "AWS_ENDPOINT_URL": closed, "LAMBDA_API_KEY": "test-key"})
    # pytest's name for the test that runs, which changes with every case (and torch reads when it is imported): no
    # user's command line has it, and without it every case can fork from the same server
    e.pop("PYTEST_CURRENT_TEST", None)
    # Unset, as in a user's shell and in the image: the trainer then keeps torch.compile's cache in the log dir (or on the
    # persistent file system), which a refused run must not create either.
    e.pop("TORCHINDUCTOR_CACHE_DIR", None)
    return e


# What the entry points import, loaded once per fork server. The cases that import torch (an eighth of them) fork from
# a second server that has it loaded too: a child of a process that holds torch takes longer to start and to exit,
# which the other cases need not pay.
PRELOAD = ["numpy", "job.sample", "job.export", "job.plot", "job.stats", "job.prepare", "job.sidecar.guard", "job.sidecar.sync",
           "job.dashboards", "fabric.main", "fabfile"]
PRELOAD_TORCH = [*PRELOAD, "torch", "job.train"]


@pytest.fixture(scope="module")
def forks(world):
    """forks(with_torch) -> the fork server the Python cases run in, started when a case first needs it; None with
    BAD_INPUTS_SUBPROCESS=1, which runs every case in a subprocess of its own."""
    if os.environ.get("BAD_INPUTS_SUBPROCESS") == "1":
        yield None
        return
    servers: dict[bool, ForkServer] = {}

    def server(with_torch: bool) -> ForkServer:
        if with_torch not in servers:
            servers[with_torch] = ForkServer(PRELOAD_TORCH if with_torch else PRELOAD, cwd=ROOT, env=base_env(world))
        return servers[with_torch]

    yield server
    for s in servers.values():
        s.close()


def run(argv: list[str], world: dict, forks, with_torch: bool = False, **extra_env) -> subprocess.CompletedProcess:
    fill = {"w": world["dir"], "ro": world["ro"], "port": world["port"], "taken": world["taken"], "scratch": world["scratch"]}
    argv = [a.format(**fill) for a in argv]
    e = base_env(world)
    for k, v in extra_env.items():
        if v is None:
            e.pop(k, None)
        else:
            e[k] = str(v).format(**fill)
    if forks is None:
        return run_process(argv, cwd=ROOT, env=e, timeout=120)
    return forks(with_torch).run(argv, cwd=ROOT, env=e, timeout=120)


# make's own line after a recipe that failed, naming the target; the recipe's line is the one under test.
MAKE_FAILED = re.compile(r"make(\[\d+\])?: \*\*\* \[[^]]*\] Error 2")


def assert_contract(proc: subprocess.CompletedProcess, needle: str | tuple[str, ...]) -> None:
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    if proc.args[0] == "make":
        assert len(lines) == 2 and MAKE_FAILED.fullmatch(lines[-1]), proc.stderr
        lines = lines[:-1]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert any(n in lines[0] for n in ([needle] if isinstance(needle, str) else needle)), (needle, lines[0])
    assert proc.returncode == 2, (proc.returncode, lines[0])


@pytest.mark.parametrize("argv,needle", CASES)
def test_a_bad_input_is_one_error_line_and_exit_2(argv, needle, world, forks, request):
    uses_ro = any("{ro}" in a for a in argv)
    if uses_ro and world["ro"] is None:
        pytest.skip(reason="no read-only directory here: root ignores mode bits, and mounting a read-only tmpfs failed")
    case_id = request.node.callspec.id
    extra = {"LAMBDA_API_KEY": ""} if case_id in NO_KEY else {}
    extra.update(CASE_ENV.get(case_id, {}))
    before = fingerprint(world["dir"])
    proc = run(argv, world, forks, case_id in TORCH_CASES, **extra)
    assert_contract(proc, needle)
    assert fingerprint(world["dir"]) == before, "a failed command changed its inputs (or left files behind)"
    log_dirs = [argv[i + 1] for i, a in enumerate(argv) if a == "--log-dir"]
    if log_dirs and log_dirs[-1].endswith("-log"):  # the case's own log dir (the last --log-dir wins)
        log = Path(log_dirs[-1].format(scratch=world["scratch"]))
        assert not log.exists() or not any(log.rglob("*")), f"the refused run left {sorted(log.rglob('*'))}"


HELP = [pytest.param([PY, "-m", m, "--help"], id=f"help-{m}")
        for m in ("job.sample", "job.export", "job.plot", "job.stats", "job.prepare", "job.sidecar.guard", "job.sidecar.sync",
                  "job.dashboards")]
HELP += [pytest.param([PY, str(ROOT / "scripts" / f"{name}.py"), "--help"], id=f"help-{name}")
         for name in ("bench_summary", "bench_prepare", "bench_image", "estimate_cuda_image", "compare_recipes")]
HELP += [pytest.param([FAB, "--help", task], id=f"help-fab-{task}") for task in ("launch", "fetch-weights", "provision")]


@pytest.mark.parametrize("argv", HELP)
def test_help_still_works(argv, world, forks):
    proc = run(argv, world, forks)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() and not proc.stderr.strip(), proc.stderr


def test_make_dashboard_on_a_taken_port_names_it_and_a_free_one(world):
    proc = run([*MAKE, "dashboard", "LOGDIR={w}/tb", "PORT={taken}"], world, None)
    assert_contract(proc, f"port {world['taken']} on 127.0.0.1 is taken")
    other = int(re.search(r"make dashboard PORT=(\d+) ", proc.stderr).group(1))
    assert other not in (0, world["taken"])
    with socket.socket() as s:  # free when it was named, as TensorBoard binds (nothing here has taken it since)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", other))
