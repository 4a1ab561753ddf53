"""The trainer's dashboards (job/dashboards.py): TensorBoard event files read back with TensorBoard's own reader, and
an offline W&B run read back with W&B's own tool (`wandb leet inspect`); both hold metrics.jsonl's values."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, assert_one_line_error, events, losses, run_cli, train_cmd
from job import contract
from job.dashboards import unreachable
from sshd import free_port

RUN = ["--checkpoint-every", "5", "--sample-num", "1", "--sample-every", "5", "--sample-tokens", "8", "--log-every", "1"]


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc


def last_values(log_dir, kind: str, key: str) -> dict[int, float]:
    """metrics.jsonl's value per step; a step logged again after a resume replaces the first attempt's."""
    return {e["step"]: e[key] for e in events(log_dir, kind)}


def as_float32(values: dict[int, float]) -> list[tuple[int, float]]:
    import numpy as np

    return [(s, float(np.float32(v))) for s, v in sorted(values.items())]  # TensorBoard stores scalars as float32


def test_event_files_hold_the_metrics_and_a_resumed_run_continues_the_curves(shards, tmp_path):
    log = tmp_path / "log"
    run_cli(*train_cmd(shards, log, *RUN, "--max-steps", "10", "--checkpoint-every", "2", "--keep-last", "2", "--eval-every", "4"),
            check=True)
    assert sorted(p.name for p in log.glob("model_*.pt")) == ["model_00008.pt", "model_00010.pt"]  # retention ran
    # An attempt that died between two checkpoints: it logged steps 8..10, and only model_00008.pt is left.
    (log / "model_00010.pt").unlink()
    out = run_cli(*train_cmd(shards, log, *RUN, "--max-steps", "12", "--eval-every", "4"), check=True).stdout
    assert "resumed from" in out and events(log, "resume")[-1]["step"] == 8
    assert len(list(log.glob(contract.TENSORBOARD_EVENTS_PREFIX + "*"))) == 2  # one file per attempt

    tb, acc = scalars(log)
    # One point per step (the first attempt's 8..10 are dropped), each equal to metrics.jsonl's last value.
    assert tb["loss/train"] == as_float32(losses(log)) and [s for s, _ in tb["loss/train"]] == list(range(12))
    # The val loss of step 8 was logged before its checkpoint and is kept once; the first attempt's val of step 10
    # is dropped (the resumed run evaluates at 12, its last step, not at 10).
    val = last_values(log, "val", "loss")
    assert tb["loss/val"] == as_float32({s: val[s] for s in (0, 4, 8, 12)}) and 10 in val
    for key, tag in (("lr", "schedule/lr"), ("norm", "train/grad_norm"), ("tok_s", "throughput/tok_s"), ("ms", "throughput/step_ms")):
        assert tb[tag] == as_float32(last_values(log, "train", key)), tag
    # The samples as text, the config as text and as the hparams plugin's session.
    texts = {e.step for e in acc.Tensors("samples/text_summary")}
    assert texts == {5, 10, 12}
    config = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| max_lr | 0.003 |" in config and "| tensorboard | 'on' |" in config
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    session = HParamsPluginData.FromString(acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    assert session.hparams["max_lr"].number_value == 0.003 and session.hparams["preset"].string_value == "tiny"


def test_tensorboard_off_writes_no_event_files(shards, tmp_path):
    log = tmp_path / "log"
    run_cli(*train_cmd(shards, log, "--max-steps", "2", "--tensorboard", "off"), check=True)
    assert losses(log) and not list(log.glob(contract.TENSORBOARD_EVENTS_PREFIX + "*"))


def inspect_history(run_dir: Path) -> list[dict]:
    """The history records of an offline W&B run, as W&B's own reader of its .wandb log prints them."""
    wandb_bin = Path(sys.executable).parent / "wandb"
    (log_file,) = run_dir.glob("run-*.wandb")
    out = subprocess.run([str(wandb_bin), "leet", "inspect", "--json", str(log_file)], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    return [r["history"]["item"] for r in records if r.get("type") == "history"]


def test_wandb_offline_run_holds_the_metrics_and_a_restart_continues_it(shards, tmp_path):
    log, key_file = tmp_path / "log", tmp_path / "wandb-api-key"
    secret = "0123456789abcdef" * 5  # a W&B key's shape: 40 hex characters, here 80
    key_file.write_text(secret + "\n")
    wandb_env = dict(WANDB_MODE="offline", NANOGPT_WANDB_KEY_FILE=key_file, WANDB_SILENT="true")
    first = run_cli(*train_cmd(shards, log, *RUN, "--max-steps", "6", "--wandb", "nanogpt-test/run1"), check=True, **wandb_env)
    run_id = (log / contract.WANDB_RUN_ID_FILE).read_text().strip()
    assert f"W&B run {run_id}: offline in" in first.stdout
    second = run_cli(*train_cmd(shards, log, *RUN, "--max-steps", "8", "--wandb", "nanogpt-test/run1"), check=True, **wandb_env)
    assert f"W&B run {run_id}:" in second.stdout and "resumed from" in second.stdout

    runs = sorted((log / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 2, sorted((log / "wandb").iterdir())  # the restart wrote into the same run id
    history = [item for r in runs for item in inspect_history(r)]
    train = {h["step"]: h["loss/train"] for h in history if "loss/train" in h}
    assert train == losses(log) and sorted(train) == list(range(8))
    val = {h["step"]: h["loss/val"] for h in history if "loss/val" in h}
    assert val == last_values(log, "val", "loss")
    # The key is read from the file and written nowhere: not in the output, not in the run's files or logs.
    assert secret not in first.stdout + first.stderr + second.stdout + second.stderr
    leaked = [p for p in log.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert not leaked


@pytest.mark.parametrize("spec", ["", "a/b/c", "my project", "proj/"])
def test_bad_wandb_spec_is_one_line(spec, shards, tmp_path):
    proc = run_cli(*train_cmd(shards, tmp_path / "log", "--max-steps", "1", "--wandb", spec))
    assert_one_line_error(proc, "--wandb", "PROJECT or PROJECT/RUN")
    assert proc.returncode == 2 and not (tmp_path / "log").exists()


def test_a_key_wandb_refuses_is_one_line_without_the_key(shards, tmp_path):
    key_file = tmp_path / "wandb-api-key"
    key_file.write_text("short-key\n")  # W&B refuses it before any network: too short
    with answering_server() as url:  # the server answers, so the probe lets W&B go on to refuse the key
        cmd = train_cmd(shards, tmp_path / "log", "--max-steps", "1", "--wandb", "proj")
        proc = run_cli(*cmd, WANDB_MODE="online", NANOGPT_WANDB_KEY_FILE=key_file, WANDB_BASE_URL=url)
    assert_one_line_error(proc, "--wandb proj: W&B refused the run", "WANDB_MODE=offline")
    assert proc.returncode == 2 and "short-key" not in proc.stdout + proc.stderr


# ---- the W&B server probe ------------------------------------------------------------------------------
class _Answers(http.server.BaseHTTPRequestHandler):
    """Every request, whatever its method or path, answered with the server's status and no body."""

    def _answer(self):
        self.send_response(self.server.status)
        if 300 <= self.server.status < 400:
            self.send_header("Location", f"http://127.0.0.1:{free_port()}/")  # a redirect to nowhere
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def answering_server(status: int = 404):
    """A real local HTTP server; 404 by default, which is what W&B's own server answers for a path it does not
    serve (W&B's telemetry asks for one and then stays quiet)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    server.status = status
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def no_proxy_env(monkeypatch):
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.mark.parametrize("status", [200, 302, 401, 404, 500])
def test_any_answer_is_a_reachable_server(status, no_proxy_env):
    with answering_server(status) as url:
        assert unreachable(url) is None  # 302 included: its target refuses connections, and is not followed


def test_an_unreachable_server_is_named_by_what_failed(no_proxy_env):
    assert unreachable(f"http://127.0.0.1:{free_port()}") == "Connection refused"
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        assert "timed out" in unreachable(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=0.5)


def test_the_probe_goes_through_the_proxy_it_is_given(no_proxy_env):
    nowhere = f"http://127.0.0.1:{free_port()}"
    with answering_server() as proxy:  # a proxy answers for the server behind it
        assert unreachable(nowhere, proxies={"http": proxy}) is None
    with answering_server() as url:
        assert unreachable(url, proxies={"http": nowhere}) == "Connection refused"


def test_an_unreachable_wandb_server_is_one_line_and_nothing_starts(shards, tmp_path):
    """W&B alone retries an unreachable server for minutes, then fails with lines of its own."""
    log, key_file = tmp_path / "log", tmp_path / "wandb-api-key"
    key_file.write_text("0123456789abcdef" * 3 + "\n")
    url = f"http://127.0.0.1:{free_port()}"
    cmd = train_cmd(shards, log, "--max-steps", "1", "--wandb", "proj")
    proc = run_cli(*cmd, WANDB_MODE="online", WANDB_BASE_URL=url, NANOGPT_WANDB_KEY_FILE=key_file)
    refused = f"--wandb proj: the W&B server {url} does not answer (Connection refused)"
    assert_one_line_error(proc, refused, "WANDB_BASE_URL", "without --wandb", "WANDB_MODE=offline")
    assert proc.returncode == 2 and "wandb:" not in proc.stdout
    assert not log.exists()  # W&B never started (it makes LOG/wandb/ first), and nothing trained


@pytest.mark.parametrize("mode", ["offline", "disabled"])
def test_offline_and_disabled_wandb_ask_no_server(mode, shards, tmp_path):
    log = tmp_path / "log"
    nowhere = f"http://127.0.0.1:{free_port()}"
    run_cli(*train_cmd(shards, log, "--max-steps", "1", "--wandb", "proj"), check=True, WANDB_MODE=mode, WANDB_BASE_URL=nowhere, WANDB_SILENT="true")
    assert list(losses(log)) == [0]
    assert len(list((log / "wandb").glob("offline-run-*"))) == (mode == "offline")  # a disabled run writes nothing


# ---- make dashboard -------------------------------------------------------------------------------------------------
def test_make_dashboard_serves_the_log_dirs_tensorboard_on_the_port_given(tmp_path, no_proxy_env):
    """The checks in front of TensorBoard let a good LOGDIR and PORT through: TensorBoard serves that log dir's scalars
    on that port (a run in a sub-directory, as --runs writes them, counts)."""
    from job.dashboards import TensorBoardWriter

    run_dir = tmp_path / "log" / "seed-1337"
    run_dir.mkdir(parents=True)
    TensorBoardWriter(run_dir).event("train", {"step": 0, "loss": 10.5})
    port = free_port()
    make = ["make", "--no-print-directory", "-C", str(ROOT), "-o", f"{sys.prefix}/.installed-stamp",
            f"VENV={sys.prefix}", "dashboard", f"LOGDIR={tmp_path / 'log'}", f"PORT={port}"]
    proc = subprocess.Popen(make, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline, tags = time.monotonic() + 120, {}
        while "seed-1337" not in tags and time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", timeout=5) as r:
                    tags = json.load(r)
            except OSError:
                time.sleep(0.5)  # not serving yet, or still reading the event files
        assert proc.poll() is None, proc.stdout.read()
        assert "loss/train" in tags.get("seed-1337", {}), tags
    finally:
        # Ctrl-C as a user stops it, but TensorBoard's reload thread can hold SIGINT for half a minute, and how it stops
        # is TensorBoard's, not what this test checks: a few seconds, then SIGKILL.
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
