"""TensorBoard and Weights & Biases, fed by the training log's events.

Every event the master rank writes to metrics.jsonl (job/metrics.py) is also handed to the writers here, so the
dashboards show exactly metrics.jsonl's numbers: they are Python floats already read back for the log line, so a
writer adds no host sync to a step. The writers run in a thread of their own (InBackground): the loop only
enqueues the event. That thread writes TensorBoard's event file, and hands W&B its records (W&B sends them to its
own service process). Only the master rank writes (other ranks have no logger).

TensorBoard's event files are in the log dir itself (`tensorboard --logdir LOG`, `make dashboard`), beside
metrics.jsonl; a resumed run writes a new file that first asks TensorBoard to drop what an earlier attempt logged
after the checkpoint it resumed from, so the curves go on without a fold. W&B (`--wandb PROJECT[/RUN]`) keeps its
run id in the log dir, so a restarted run writes into the same W&B run; its API key is read from the file the
launcher mounts (job/contract.env's WANDB_KEY_FILE) or W&B's own settings (WANDB_API_KEY, ~/.netrc), and
WANDB_MODE=offline keeps the run on disk for `wandb sync`. Before an online run starts, its server is asked for any
answer within seconds: W&B retries an unreachable server for over a minute before it gives up.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import importlib.util
import json
import os
import queue
import secrets
import socket
import ssl
import string
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from job import contract
from job.errors import ArgumentParser, UserError, cli_main, number

# metrics.jsonl event -> its numeric fields as dashboard tags; a train event's other fields (a recipe's schedule
# values, e.g. momentum) go under schedule/. The loss tags share one section, so train and val sit side by side.
TAGS = {
    "train": {"loss": "loss/train", "lr": "schedule/lr", "norm": "train/grad_norm", "tok_s": "throughput/tok_s",
              "mfu": "throughput/mfu", "ms": "throughput/step_ms"},
    "val": {"loss": "loss/val"},
    "hellaswag": {"acc_norm": "hellaswag/acc_norm"},
}
NOT_SCALARS = {"event", "time", "step"}


def scalars(kind: str, fields: dict) -> dict[str, float]:
    """The dashboard scalars of one metrics.jsonl event (tag -> value)."""
    tags = TAGS.get(kind)
    if tags is None:
        return {}
    out = {}
    for key, value in fields.items():
        if key in NOT_SCALARS or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        tag = tags.get(key, f"schedule/{key}" if kind == "train" else None)
        if tag:
            out[tag] = float(value)
    return out


def samples_markdown(fields: dict) -> str:
    prompt = fields.get("prompt", "")
    return "\n\n".join(f"**{i}.** `{prompt}` {json.dumps(text)}" for i, text in enumerate(fields.get("samples", [])))


def evaluations_at(metrics_file: Path, step: int, until: dict) -> list[dict]:
    """The last val, HellaSwag and sample events of `step` in metrics.jsonl before the event `until` (the resume),
    oldest first: what earlier attempts logged, not what this run logs after it."""
    found = {}
    with open(metrics_file, encoding="utf-8") as f:
        for line in f:
            try:
                e = json.loads(line)
            except ValueError:
                continue  # a line torn by a crash
            if e == until:
                break
            if isinstance(e, dict) and e.get("step") == step and e.get("event") in ("val", "hellaswag", "sample"):
                found[e["event"]] = e
    return sorted(found.values(), key=lambda e: e.get("time", 0))


def hparam_value(value):
    """A config value as TensorBoard's hparams plugin takes it (bool, int, float or str)."""
    return value if isinstance(value, (bool, int, float, str)) else str(value)


class EventFile:
    """One TensorBoard event file, written in TensorBoard's record format by the writers' thread itself (TensorBoard's
    own writer adds a thread of its own, whose failure would print a traceback). Like the logs, the file is opened
    for each event and closed again: the dashboard is live, a crash loses nothing, and no file stays open in the log
    dir. A write that fails (a full disk, a mount gone read-only) is said once and retried with the next event;
    metrics.jsonl keeps every value."""

    def __init__(self, log_dir: Path, purge_step: int):
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        self.Event = Event
        self.path = log_dir / f"{contract.TENSORBOARD_EVENTS_PREFIX}{int(time.time())}.{socket.gethostname()}.{os.getpid()}.0"
        self.warned = False
        # TensorBoard takes a file's session start as the run's start, and a later one as a restart: the records of
        # earlier files at and after its step are dropped.
        self.write([Event(wall_time=time.time(), file_version="brain.Event:2"),
                    Event(wall_time=time.time(), step=purge_step, session_log=SessionLog(status=SessionLog.START))])

    def write(self, events: list) -> None:
        from tensorboard.summary.writer.record_writer import RecordWriter

        size = self.path.stat().st_size if self.path.exists() else 0
        try:
            with open(self.path, "ab") as f:
                records = RecordWriter(f)
                for event in events:
                    records.write(event.SerializeToString())
        except OSError as e:
            with contextlib.suppress(OSError):
                os.truncate(self.path, size)  # no half record for the next event to follow: readers would stop there
            if not self.warned:
                self.warned = True
                print(f"warning: cannot append to {self.path} ({e.strerror}): training goes on; the TensorBoard records are "
                      "retried at each event, and metrics.jsonl has every value", file=sys.stderr, flush=True)

    def event(self, summary, step: int | None = None, walltime: float | None = None):
        return self.Event(summary=summary, step=step or 0, wall_time=walltime or time.time())


class TensorBoardWriter:
    """Event files in the log dir, one per run or resumed run. The file opens at the run's first event: a "resume"
    event says from which step the earlier attempts' records are dropped."""

    def __init__(self, log_dir):
        self.dir = Path(log_dir)
        self.file: EventFile | None = None

    def event(self, kind: str, fields: dict) -> None:
        from torch.utils.tensorboard.summary import scalar, text

        step = fields.get("step")
        if self.file is None:
            # Resumed at step s: the new file drops every record of step s and after, which an earlier attempt may
            # have logged, and writes them again. The update s is logged again by the resumed run; the evaluations
            # of step s were done before the checkpoint, so they are copied from metrics.jsonl.
            self.file = EventFile(self.dir, step if kind == "resume" else 0)
            if kind == "resume":
                for earlier in evaluations_at(self.dir / contract.METRICS_FILE, step, until=fields):
                    self.event(earlier["event"], earlier)
        when, out = fields.get("time"), []
        for tag, value in scalars(kind, fields).items():
            out.append(self.file.event(scalar(tag, value), step, when))
        if kind == "sample":
            out.append(self.file.event(text("samples", samples_markdown(fields)), step, when))
        elif kind == "start":
            out += self._config(fields.get("config", {}), when)
        if out:
            self.file.write(out)

    def _config(self, config: dict, when: float | None) -> list:
        from torch.utils.tensorboard.summary import hparams, text

        exp, start, _ = hparams({k: hparam_value(v) for k, v in config.items()}, {"loss/val": 0.0, "hellaswag/acc_norm": 0.0})
        table = "\n".join(f"| {k} | {v!r} |" for k, v in config.items())
        config_text = text("config", "| setting | value |\n| --- | --- |\n" + table)
        return [self.file.event(summary, 0, when) for summary in (exp, start, config_text)]

    def close(self, failed: bool = False) -> None:
        pass  # every event's records are on disk already


def parse_wandb(spec: str) -> tuple[str, str | None]:
    project, _, name = spec.partition("/")
    return project, name or None


def new_run_id() -> str:
    """A W&B run id: eight characters of [a-z0-9], as W&B makes its own."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def wandb_api_key() -> str | None:
    """The key the launcher put on the box (a 0600 file mounted read-only), if there is one; else W&B finds its own."""
    path = Path(os.environ.get("NANOGPT_WANDB_KEY_FILE", contract.WANDB_KEY_FILE))
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


PROBE_SECONDS = 5  # a W&B server that has not answered by then is taken as out of reach


class _KeepRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # a redirect is an answer: where it leads is W&B's to follow


def unreachable(url: str, proxies: dict[str, str] | None = None, timeout: float = PROBE_SECONDS) -> str | None:
    """Why the server at `url` gives no answer (connection refused, name unknown, timed out), or None when it answers
    anything at all: an HTTP error status or a TLS handshake W&B may judge otherwise (its own certificate store) is an
    answer, and W&B says itself what it makes of it. The proxies are the environment's, overridden by `proxies`."""
    proxy = urllib.request.ProxyHandler({**urllib.request.getproxies(), **(proxies or {})})
    opener = urllib.request.build_opener(proxy, _KeepRedirects())
    try:
        with opener.open(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None
    except urllib.error.URLError as e:
        reason = e.reason
    except (OSError, http.client.HTTPException) as e:  # a timeout or a reset after the connection was made
        reason = e
    if isinstance(reason, ssl.SSLError):
        return None
    return getattr(reason, "strerror", None) or str(reason) or type(reason).__name__


def check_wandb_server(spec: str, settings) -> None:
    """Refuse an online W&B run whose server does not answer, in one line, before wandb.init: W&B itself would retry
    for over a minute and then fail with lines of its own. The server and the mode are those W&B would use: its global
    settings (WANDB_BASE_URL, WANDB_MODE, the host `wandb login --host` saved) under the run's `settings`, as
    wandb.init merges them. Offline and disabled runs make no connection, so nothing is asked."""
    import pydantic
    import wandb

    try:
        run_settings = wandb.setup().settings.model_copy()
        run_settings.update_from_settings(settings)
    except pydantic.ValidationError as e:  # W&B validates its settings, those from WANDB_* variables among them
        err = e.errors()[0]
        field = ".".join(str(part) for part in err.get("loc", ())) or "a setting"
        raise UserError(f"--wandb {spec}: W&B refuses its setting {field} ({err.get('msg')}): fix the WANDB_{field.upper()} "
                        "variable or W&B's settings file, or train without --wandb") from None
    if run_settings.mode in ("offline", "dryrun", "disabled"):
        return
    proxies = {scheme: proxy for scheme, proxy in (("http", run_settings.http_proxy), ("https", run_settings.https_proxy)) if proxy}
    reason = unreachable(run_settings.base_url, proxies)
    if reason is not None:
        raise UserError(
            f"--wandb {spec}: the W&B server {run_settings.base_url} does not answer ({reason}): check that URL "
            "(WANDB_BASE_URL, or the host `wandb login --host` saved) and this machine's network, or train "
            "without --wandb, or set WANDB_MODE=offline to keep the run on disk for `wandb sync`"
        )


class WandbWriter:
    """One W&B run per log dir: its id is kept in the log dir, and a restart resumes it (resume="allow"). Every
    metric is plotted against the trainer's step, so a resumed run's records land where they belong."""

    def __init__(self, log_dir, spec: str, config: dict):
        import wandb

        project, name = parse_wandb(spec)
        self.dir = Path(log_dir)
        id_file = self.dir / contract.WANDB_RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else new_run_id()
        key = wandb_api_key()
        # console="off": the trainer's stdout stays its own (no wrapping of sys.stdout); the key never leaves memory.
        settings = wandb.Settings(console="off", **({"api_key": key} if key else {}))
        try:
            check_wandb_server(spec, settings)
            self.run = wandb.init(project=project, name=name, id=run_id, resume="allow", dir=str(self.dir), config=config,
                                  settings=settings)
        except wandb.errors.Error as e:
            raise UserError(f"--wandb {spec}: W&B refused the run ({' '.join(str(e).split())[:200]}): log in with `wandb login`, "
                            "pass the key to fab launch (it reads WANDB_API_KEY or ~/.netrc), or set WANDB_MODE=offline") from None
        if not id_file.exists():
            id_file.write_text(run_id + "\n")
        self.run.define_metric("step", hidden=True)
        self.run.define_metric("*", step_metric="step")
        where = self.run.url or f"offline in {Path(self.run.dir).parent} (`wandb sync` uploads it)"
        print(f"W&B run {run_id}: {where}", flush=True)

    def event(self, kind: str, fields: dict) -> None:
        import wandb

        record = scalars(kind, fields)
        if kind == "sample":
            record["samples"] = wandb.Html("<br>".join(samples_markdown(fields).split("\n\n")))
        if record:
            self.run.log({"step": fields["step"], **record})

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class InBackground:
    """The writers, fed from a queue by a thread of their own: the training loop only enqueues (microseconds), and
    the writers' work (protobufs, W&B's records) runs while the loop waits on the GPU. close() writes what is queued."""

    def __init__(self, writers: list):
        self.writers = writers
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._drain, name="dashboards", daemon=True)
        self.thread.start()

    def event(self, kind: str, fields: dict) -> None:
        self.queue.put((kind, fields))

    def _drain(self) -> None:
        while (item := self.queue.get()) is not None:
            for w in list(self.writers):
                try:
                    w.event(*item)
                except Exception as e:  # a dashboard is not worth a training run: drop it, say so once
                    self.writers.remove(w)
                    warn(w, e)

    def close(self, failed: bool = False) -> None:
        self.queue.put(None)
        self.thread.join()
        for w in self.writers:
            try:
                w.close(failed)
            except Exception as e:
                warn(w, e)


def open_writers(cfg) -> list:
    """The dashboards this run writes to, for the master rank's MetricsLogger. W&B starts here, in the caller, so a
    refused key or project stops the run before its first step."""
    writers = []
    if cfg.tensorboard == "on":
        writers.append(TensorBoardWriter(cfg.log_dir))
    if cfg.wandb:
        writers.append(WandbWriter(cfg.log_dir, cfg.wandb, cfg.to_dict()))
    return [InBackground(writers)] if writers else []


def warn(writer, e: Exception) -> None:
    name = type(writer).__name__.replace("Writer", "")
    print(f"warning: the {name} writer failed ({type(e).__name__}: {' '.join(str(e).split())[:200]}): training goes on "
          "without it; metrics.jsonl has every value", file=sys.stderr, flush=True)


# --- make dashboard: TensorBoard over a log dir on this machine ----------------------------------------------------
# The Makefile hands its LOGDIR and PORT to main(), which checks both before TensorBoard starts (TensorBoard's own
# answers are its usage block for a port that is no number, and a log line and status 255 for a taken one) and then
# becomes TensorBoard. The words are make's, since that is what the user typed.
MAKE_PORT_FIX = "make dashboard PORT={port} (PORT=0 lets TensorBoard pick a free one)"


def dashboard_port(text: str) -> int:
    """PORT as a port TensorBoard can listen on at 127.0.0.1 now, or one line naming another that is free."""
    try:
        port = number(text.strip(), "PORT", int, 0, 65535)
    except UserError as e:
        raise UserError(f"{e}: pass a port from 1 to 65535, e.g. {MAKE_PORT_FIX.format(port=contract.TENSORBOARD_PORT)}") from None
    if port == 0:
        return port
    try:
        _bind(port)
    except OSError as e:
        taken = "is taken (a TensorBoard still running?)" if e.errno == errno.EADDRINUSE else f"cannot be listened on ({e.strerror})"
        raise UserError(f"port {port} on 127.0.0.1 {taken}: choose another, e.g. {MAKE_PORT_FIX.format(port=free_port_after(port))}") from None
    return port


def _bind(port: int) -> None:
    """Bind and let go at once, as TensorBoard's server binds (SO_REUSEADDR: a port left in TIME_WAIT is free to it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def free_port_after(port: int) -> int:
    """The first port above `port` that is free now (for the advice), else 0."""
    for candidate in range(port + 1, min(port + 100, 65535) + 1):
        try:
            _bind(candidate)
        except OSError:
            continue
        return candidate
    return 0


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="make dashboard", description="TensorBoard over a run's log dir at http://127.0.0.1:PORT/ "
                       "(what `make dashboard LOGDIR=DIR PORT=N` runs)")
    p.add_argument("logdir", help="the run's log dir (LOGDIR)")
    p.add_argument("port", help=f"the port on 127.0.0.1 (PORT, default {contract.TENSORBOARD_PORT}; 0: any free one)")
    args = p.parse_args(argv)
    log_dir = Path(args.logdir)
    # TensorBoard reads runs in sub-directories too (--runs' seed-S), so they count. An empty LOGDIR is a mistake, not
    # the current directory (which may hold other runs).
    if not args.logdir or not log_dir.is_dir() or next(log_dir.rglob(f"{contract.TENSORBOARD_EVENTS_PREFIX}*"), None) is None:
        raise UserError(f"no TensorBoard event files in {args.logdir or repr(args.logdir)}: pass the run's log dir as "
                        "LOGDIR=... (the trainer writes them unless --tensorboard off)")
    port = dashboard_port(args.port)
    if importlib.util.find_spec("tensorboard") is None:
        raise UserError("TensorBoard is not installed in this Python: run `make venv` (requirements-dev.txt has it)")
    # --load_fast=false: TensorBoard's Python reader, which honours the purge a resumed run's event file asks for.
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(log_dir), "--host", "127.0.0.1", "--port", str(port),
           "--load_fast=false"]
    print(" ".join(cmd), flush=True)
    os.execv(sys.executable, cmd)  # TensorBoard in this process: Ctrl-C reaches it as before


if __name__ == "__main__":
    main()
