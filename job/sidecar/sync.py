"""The S3 sidecar: runs on the box beside the trainer and uploads each checkpoint as soon as it is complete.

    python -m job.sidecar.sync --log-dir /app/log --s3 s3://BUCKET/PREFIX [--endpoint-url URL] [--interval 10]

`fab launch --sync-s3 s3://...` starts it in its own container (same image, the weights dir mounted), before
the trainer. A checkpoint file only ever appears complete (the trainer writes a temp name and renames), so
anything matching model_*.pt can be uploaded at once; after upload and read-back verification (size + sha256)
a marker `.synced-<name>` is written beside it. The logs (metrics.jsonl, train.log, log.txt, TensorBoard's
event files) follow on each pass when they changed. The sidecar exits after the pass that follows the trainer's "end" event (training
done or stopped) in metrics.jsonl, or on SIGTERM after one last pass, so a box that dies loses nothing that
was already saved. A pass that fails (S3 unreachable, credentials expired, no room for a marker) is reported
once and retried every interval, never fatal: a dead sidecar would upload nothing more. SIGTERM while failing
exits 1 after one last try.

Contract with the cost guard (job/sidecar/guard.py): the final checkpoint is safely in S3 once its
`.synced-<name>` marker exists; the marker holds the JSON {"url", "sha256", "size"} of the uploaded object.

Credentials: the usual AWS chain inside the container. `fab launch` writes the laptop's credentials to a
0600 file on the box and mounts it read-only with AWS_SHARED_CREDENTIALS_FILE pointing at it: the keys are in
no command line, no environment variable (which `docker inspect` would show) and no log.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from job import contract
from job.errors import ArgumentParser, UserError, cli_main, float_arg
from job.sidecar.s3 import client, parse_s3_url, upload_files

LOG_FILES = (contract.METRICS_FILE, contract.HUMAN_LOG_FILE, contract.NANOGPT_LOG_FILE)
MARKER = contract.SYNCED_MARKER


def marker(log_dir: Path, name: str) -> Path:
    return log_dir / MARKER.format(name=name)


def pending_checkpoints(log_dir: Path) -> list[Path]:
    return [p for p in sorted(log_dir.glob(contract.CHECKPOINT_GLOB)) if not marker(log_dir, p.name).exists()]


def ended(log_dir: Path, offset: int) -> bool:
    """True once the trainer logged its "end" event after `offset` (the file's size when the sidecar started)."""
    path = log_dir / contract.METRICS_FILE
    if not path.exists() or path.stat().st_size <= offset:
        return False
    with open(path, "rb") as f:
        f.seek(offset)
        for line in f.read().splitlines():
            try:
                if json.loads(line).get("event") == "end":
                    return True
            except (ValueError, AttributeError):
                continue  # a partly written line
    return False


class Syncer:
    def __init__(self, log_dir: Path, url: str, s3, out=sys.stdout):
        self.log_dir, self.url, self.s3, self.out = log_dir, url, s3, out
        self.log_state: dict[str, tuple[int, int]] = {}
        parse_s3_url(url)

    def sync_once(self) -> list[str]:
        done = []
        for ckpt in pending_checkpoints(self.log_dir):
            report = upload_files([ckpt], self.url, s3=self.s3)
            digest = report.sha256[ckpt.name]
            tmp = marker(self.log_dir, ckpt.name).with_suffix(".tmp")
            try:
                tmp.write_text(json.dumps({"url": f"{self.url.rstrip('/')}/{ckpt.name}", "sha256": digest, "size": ckpt.stat().st_size}))
                os.replace(tmp, marker(self.log_dir, ckpt.name))
            except OSError:
                tmp.unlink(missing_ok=True)
                raise
            verb = "uploaded" if report.uploaded else "already in S3:"
            self.out.write(f"sync: {verb} {ckpt.name} -> {self.url}\n")
            done.append(ckpt.name)
        changed = []
        events = sorted(p.name for p in self.log_dir.glob(contract.TENSORBOARD_EVENTS_PREFIX + "*"))
        for name in (*LOG_FILES, *events):  # TensorBoard's event files grow like the logs
            p = self.log_dir / name
            if p.exists():
                st = p.stat()
                if self.log_state.get(name) != (st.st_size, st.st_mtime_ns):
                    changed.append(p)
                    self.log_state[name] = (st.st_size, st.st_mtime_ns)
        if changed:
            upload_files(changed, self.url, s3=self.s3)
        # Retention deleted some checkpoints: drop their markers too.
        for m in self.log_dir.glob(MARKER.format(name="*")):
            if not (self.log_dir / m.name[len(MARKER.format(name="")):]).exists():
                m.unlink(missing_ok=True)
        self.out.flush()
        return done


def run_sidecar(log_dir: Path, url: str, s3, interval: float, out=sys.stdout) -> None:
    metrics = log_dir / contract.METRICS_FILE
    offset = metrics.stat().st_size if metrics.exists() else 0
    syncer = Syncer(log_dir, url, s3, out)
    stop = {"requested": False}

    def on_term(signum, frame):
        stop["requested"] = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    out.write(f"sync: watching {log_dir} for checkpoints, uploading to {url}\n")
    out.flush()
    failing = ""  # the last pass's error, said once until it changes or clears
    while True:
        finished = ended(log_dir, offset) or stop["requested"]
        try:
            syncer.sync_once()
        except Exception as e:  # S3 unreachable, credentials expired, no room for a marker: a dead sidecar uploads nothing
            why = " ".join((str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}").split())[:300]
            if why != failing:
                out.write(f"sync: error: {why}; retrying every {interval:g} s\n")
                out.flush()
            failing = why
            if stop["requested"]:  # a stop (fab stop, docker stop) while failing: do not hold the box hostage
                out.write(f"sync: stopped with checkpoints not confirmed in S3 ({why})\n")
                out.flush()
                raise SystemExit(contract.EXIT_FAILED) from None
        else:
            if failing:
                out.write("sync: working again\n")
                failing = ""
            if finished:
                out.write("sync: training ended and every checkpoint is in S3: exiting\n" if not stop["requested"]
                          else "sync: stopped after a last pass\n")
                out.flush()
                return
        deadline = time.monotonic() + interval
        while time.monotonic() < deadline and not stop["requested"]:
            time.sleep(0.2)


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m job.sidecar.sync", description=__doc__.split("\n\n")[0])
    p.add_argument("--log-dir", default=contract.LOG_DIR)
    p.add_argument("--s3", required=True, help="s3://BUCKET/PREFIX")
    p.add_argument("--endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL"), help="S3-compatible endpoint")
    p.add_argument("--interval", type=float_arg(above=0), default=10.0, help="seconds between passes")
    a = p.parse_args(argv)
    if Path(a.log_dir).exists() and not Path(a.log_dir).is_dir():
        raise UserError(f"--log-dir {a.log_dir} is a file: pass the trainer's log dir")
    run_sidecar(Path(a.log_dir), a.s3, client(a.endpoint_url), a.interval)


if __name__ == "__main__":
    main()
