"""The cost guard: runs on the box, beside the trainer, and terminates the instance once training is over and the
final checkpoint is verified safe, or caps the run at --max-hours. It works with the laptop closed.

    python -m job.sidecar.guard --instance-id ID --log-dir /app/log --api-key-file /run/secrets/lambda_api_key
                          [--terminate-when-done] [--max-hours H] [--s3 s3://BUCKET/PREFIX] [--s3-endpoint URL]
                          [--stop-grace-minutes 30] [--idle-minutes 0] [--keep-on-failure] [--poll-seconds 30]

It needs only the stdlib, requests, boto3 (with --s3) and job.contract, job.errors and job/sidecar/ (no torch): it
runs in a container of the trainer image, with the weights dir mounted at --log-dir, no GPU and no Docker access.

File contract, all in the log dir (the box's weights dir; names start with "." so fetch-weights ignores them):

  metrics.jsonl  {"event": "end", "reason": "done"|"stopped"|"diverged"|"checkpoint-failed"}, written by the trainer
                 after its final checkpoint (diverged: after the saves in flight landed, writing no new one;
                 checkpoint-failed: a checkpoint could not be written, e.g. a full disk, and training stopped).
                 Only "end" lines appended after the guard first started count (a resumed run's old ones do not).
  .train-exit    the trainer container's exit status as text (job.contract.EXIT_STATUSES says what each means; the
                 supervisor passes the trainer's own status on), written by the launcher side when the
                 container exits (e.g. `docker wait NAME > .train-exit.tmp && mv .train-exit.tmp .train-exit` on the
                 host). Covers crashes, which log no "end". Ignored if older than the guard's first start.
  .stop-request  written by the guard at --max-hours (JSON {"reason", "time"}). Whoever owns the trainer turns it
                 into a clean stop: SIGTERM to the trainer (`docker stop -t 600 CONTAINER`, or the trainer checking
                 for the file each step), which checkpoints, logs "end" and exits 0. The guard cannot signal the
                 trainer itself: it has no Docker socket (that would be root on the host) and no shared PID namespace.
  .synced-NAME   written by the S3 sidecar (job/sidecar/sync.py) once NAME is uploaded and verified: JSON {"url", "sha256",
                 "size"}. A hint only: the guard checks the object itself (HEAD: size, and the sha256 metadata
                 against the sha256 it computes of the local file).
  .fetched-NAME  written by the laptop (over SSH) after fetch-weights verified NAME on local disk: its sha256, as
                 text or JSON {"sha256"}. Counts as safe when it matches the local file's sha256.
  .guard-status  JSON the guard rewrites on every change: {"state", "detail", "instance_id", "deadline", "time"};
                 states: watching, stop-requested, waiting-sync, blocked, terminating, terminated, kept, error.
  .guard-ID.json the guard's own state (first start, deadline, metrics.jsonl offset), so a restarted guard keeps
                 the same --max-hours clock.

Rules: training is over on a new "end" event, a new .train-exit, or (with --idle-minutes) no write to the log dir
for that long. Then, with --terminate-when-done, the newest checkpoint must be verified in S3 (with --s3 or a
.synced marker) or on the laptop (.fetched marker) before the instance is terminated; with no checkpoint at all
there is nothing to lose. At --max-hours the guard writes .stop-request and, once training is over, does the same;
if the trainer ignores the request for --stop-grace-minutes, the guard terminates anyway provided the newest
checkpoint is verified (the steps since then are lost), and otherwise keeps the box and says why in .guard-status:
it never destroys the only copy of a checkpoint. A failed run (non-zero exit, or an "end" event whose reason
is diverged or checkpoint-failed: job.contract.END_REASONS) with --keep-on-failure is left running for inspection.

The API key: Lambda Cloud API keys are not scoped (any key can launch and terminate anything in the account), so
the guard narrows its own use instead: it reads the key from a 0600 file mounted read-only (never an environment
variable: those show in `docker inspect`), and its only call is POST /instance-operations/terminate with its own
--instance-id; `SelfTerminator` refuses any other id. Anyone with root on the box can still read the key: use a
dedicated key for launched runs and delete it in the Lambda dashboard when the run is over.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

from job import contract
from job.contract import END_REASONS
from job.errors import ArgumentParser, UserError, cli_main, float_arg
from job.sidecar.digest import sha256_file
from job.sidecar.lambda_cloud import LambdaAPIError, LambdaCloud, load_api_key

STATUS = ".guard-status"
STOP = contract.STOP_REQUEST_FILE
EXIT = contract.TRAIN_EXIT_FILE  # written on the box when the trainer container exits
SYNCED = contract.SYNCED_MARKER  # written by the S3 sidecar
FETCHED = contract.FETCHED_MARKER  # written by fetch-weights


class SelfTerminator:
    """The guard's whole use of the API: terminate one instance, its own."""

    def __init__(self, api: LambdaCloud, instance_id: str):
        if not instance_id:
            raise UserError("no --instance-id: the guard terminates only the instance it was started for")
        self.api, self.instance_id = api, instance_id

    def terminate(self, instance_ids: list[str]) -> list[dict]:
        if list(instance_ids) != [self.instance_id]:
            raise UserError(f"the guard may terminate only its own instance {self.instance_id}, refused {instance_ids}")
        return self.api.terminate([self.instance_id])


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def check_settings(terminate_when_done: bool, max_hours: float | None) -> None:
    """What the guard refuses to start with; the launcher asks the same on the laptop, before anything is billed."""
    if max_hours is not None and max_hours <= 0:
        raise UserError(f"--max-hours must be positive, got {max_hours}")
    if not terminate_when_done and not max_hours:
        raise UserError("nothing to guard: pass --terminate-when-done and/or --max-hours H")


class Guard:
    def __init__(self, log_dir: Path, terminator: SelfTerminator, *, terminate_when_done: bool = False, max_hours: float | None = None,
                 s3_url: str | None = None, s3=None, stop_grace_minutes: float = 30.0, idle_minutes: float = 0.0,
                 keep_on_failure: bool = False, out=sys.stdout, clock=time.time):
        check_settings(terminate_when_done, max_hours)
        self.dir, self.term, self.when_done, self.s3_url, self.s3 = Path(log_dir), terminator, terminate_when_done, s3_url, s3
        self.grace, self.idle, self.keep_on_failure, self.out, self.clock = stop_grace_minutes * 60, idle_minutes * 60, keep_on_failure, out, clock
        if not self.dir.is_dir():
            raise UserError(f"log dir {self.dir} does not exist: mount the box's weights dir there")
        self._unwritable = False  # warned that the log dir refuses writes (a full disk): guarding goes on from memory
        self.state = self._load_state(max_hours)
        self._hashes: dict[str, tuple[int, int, str]] = {}
        self._status: tuple[str, str] | None = None

    # --- persistent state ---------------------------------------------------------------------------
    def _load_state(self, max_hours: float | None) -> dict:
        """The first start's clock and metrics offset, kept across restarts of this guard; a guard whose run was
        already settled (terminated or kept) starts afresh, since a new launch on the same box is a new run."""
        path = self.dir / f".guard-{self.term.instance_id}.json"
        try:
            state = json.loads(path.read_text())
            settled = json.loads((self.dir / STATUS).read_text()).get("state") in ("terminated", "kept")
        except (OSError, ValueError, AttributeError):
            state, settled = None, False
        if state is None or settled:
            metrics = self.dir / contract.METRICS_FILE
            now = self.clock()
            state = {"started": now, "metrics_offset": metrics.stat().st_size if metrics.exists() else 0,
                     "deadline": now + max_hours * 3600 if max_hours else None}
            (self.dir / STOP).unlink(missing_ok=True)  # an old run's request must not stop this one
            self._write(path, json.dumps(state))
        return state

    def _write(self, path: Path, text: str) -> None:
        """Write one of the guard's files, or say once that the log dir refuses writes and go on without: the files
        only report and persist; a guard that died on a full disk would leave the box running, billing."""
        try:
            atomic_write(path, text)
        except OSError as e:
            if not self._unwritable:
                self._unwritable = True
                self.out.write(f"guard: warning: cannot write {path.name} in {self.dir} ({e.strerror}): guarding goes on from "
                               "memory; statuses go to this output only\n")
                self.out.flush()

    def status(self, state: str, detail: str) -> None:
        if self._status == (state, detail):
            return
        self._status = (state, detail)
        self._write(self.dir / STATUS, json.dumps({"state": state, "detail": detail, "instance_id": self.term.instance_id,
                                                    "deadline": self.state["deadline"], "time": round(self.clock(), 3)}))
        self.out.write(f"guard: {state}: {detail}\n")
        self.out.flush()

    # --- observations -------------------------------------------------------------------------------
    def ended(self) -> tuple[str, int | None] | None:
        """(why, exit status or None) once training is over, else None."""
        metrics = self.dir / contract.METRICS_FILE
        if metrics.exists() and metrics.stat().st_size > self.state["metrics_offset"]:
            with open(metrics, "rb") as f:
                f.seek(self.state["metrics_offset"])
                for line in f.read().splitlines():
                    try:
                        e = json.loads(line)
                    except ValueError:
                        continue  # a line being written
                    if isinstance(e, dict) and e.get("event") == "end":
                        reason = e.get("reason", "end")
                        return f"training ended ({reason} at step {e.get('step', '?')})", END_REASONS.get(reason, 0)
        exit_file = self.dir / EXIT
        if exit_file.exists() and exit_file.stat().st_mtime >= self.state["started"] - 1:
            text = exit_file.read_text().strip()
            code = int(text) if text.lstrip("-").isdigit() else None
            return f"the trainer exited with status {text or '?'}", code
        if self.idle:
            newest = max([p.stat().st_mtime for p in self.dir.iterdir() if not p.name.startswith(".guard")] + [self.state["started"]])
            if self.clock() - newest > self.idle:
                return f"no write to {self.dir} for {self.idle / 60:.0f} min (trainer hung or gone)", None
        return None

    def newest_checkpoint(self) -> Path | None:
        prefix = contract.CHECKPOINT_GLOB.split("*")[0]
        found = []
        for p in self.dir.glob(contract.CHECKPOINT_GLOB):
            step = p.name[len(prefix):-3]
            if step.isdigit() and p.is_file():
                found.append((int(step), p))
        return max(found)[1] if found else None

    def sha256(self, path: Path) -> str:
        st = path.stat()
        cached = self._hashes.get(path.name)
        if cached and cached[:2] == (st.st_size, st.st_mtime_ns):
            return cached[2]
        digest = sha256_file(path)
        self._hashes[path.name] = (st.st_size, st.st_mtime_ns, digest)
        return digest

    def safe_copy(self, ckpt: Path) -> tuple[str | None, str]:
        """(where it is verified, or None; why not) for this checkpoint."""
        digest, size = self.sha256(ckpt), ckpt.stat().st_size
        fetched = self.dir / FETCHED.format(name=ckpt.name)
        note = ""
        if fetched.exists():
            text = fetched.read_text().strip()
            try:
                text = json.loads(text).get("sha256", "")
            except (ValueError, AttributeError):
                pass
            if text == digest:
                return "on the laptop (fetched, sha256 verified)", ""
            note = f" ({fetched.name} does not match the local file's sha256)"
        url = None
        if self.s3_url:
            url = f"{self.s3_url.rstrip('/')}/{ckpt.name}"
        else:
            marker = self.dir / SYNCED.format(name=ckpt.name)
            if marker.exists():
                try:
                    url = json.loads(marker.read_text()).get("url")
                except (ValueError, AttributeError):
                    url = None
        if not url:
            return None, f"{ckpt.name} is not confirmed anywhere yet (no S3 URL, no .synced or .fetched marker){note}"
        why = self._s3_check(url, size, digest)
        return (f"in {url} (size and sha256 verified)", "") if not why else (None, why + note)

    def _s3_check(self, url: str, size: int, digest: str) -> str:
        from botocore.exceptions import BotoCoreError, ClientError

        from job.sidecar.s3 import client, parse_s3_url

        bucket, key = parse_s3_url(url)
        try:
            self.s3 = self.s3 or client(None)
            head = self.s3.head_object(Bucket=bucket, Key=key)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "error")
            return f"{url} is not in S3 yet" if code in ("404", "NoSuchKey", "NotFound") else f"S3 refused HEAD {url} ({code})"
        except BotoCoreError as e:
            return f"cannot reach S3 for {url} ({type(e).__name__})"
        if head.get("ContentLength") != size:
            return f"{url} differs from the local file (size {head.get('ContentLength')} != {size})"
        if head.get("Metadata", {}).get("sha256") != digest:
            return f"{url} differs from the local file (sha256)"
        return ""

    # --- decisions ----------------------------------------------------------------------------------
    def step(self) -> str | None:
        """One look at the log dir; returns a final state (terminated, kept) or None to keep watching."""
        now, deadline = self.clock(), self.state["deadline"]
        over = self.ended()
        stop_file = self.dir / STOP
        capped = bool(deadline and now >= deadline)
        if capped and not stop_file.exists():
            self._write(stop_file, json.dumps({"reason": f"--max-hours reached ({(deadline - self.state['started']) / 3600:g} h)",
                                               "time": round(now, 3)}))
        if over is None:
            # The grace runs from the request as written (its time survives a restart of the guard), or from the
            # deadline when the request could not be written (a full disk: the trainer was never asked).
            if capped and now - _requested_at(stop_file, deadline) >= self.grace:
                return self._finish("the trainer did not stop within the grace period after the stop request", forced=True)
            if capped:
                self.status("stop-requested", f"--max-hours reached: wrote {STOP}, waiting for the trainer to checkpoint and stop")
            else:
                left = f", {((deadline - now) / 3600):.2f} h left" if deadline else ""
                self.status("watching", f"training in progress{left}")
            return None
        why, code = over
        if code not in (0, None) and self.keep_on_failure:
            self.status("kept", f"{why}: kept running for inspection (--keep-on-failure); terminate it yourself")
            return "kept"
        if not self.when_done and not capped:
            self.status("watching", f"{why}; terminating at --max-hours")
            return None
        return self._finish(why, forced=False)

    def _finish(self, why: str, forced: bool) -> str | None:
        ckpt = self.newest_checkpoint()
        if ckpt is None:
            if forced:
                self.status("blocked", f"{why}, and there is no checkpoint at all: keeping the box (terminate it yourself)")
                return None
            return self._terminate(f"{why}; no checkpoint to keep")
        where, reason = self.safe_copy(ckpt)
        if not where:
            state = "blocked" if forced else "waiting-sync"
            self.status(state, f"{why}; not terminating until {ckpt.name} is safe: {reason}")
            return None
        return self._terminate(f"{why}; {ckpt.name} is {where}")

    def _terminate(self, why: str) -> str | None:
        self.status("terminating", why)
        try:
            self.term.terminate([self.term.instance_id])
        except LambdaAPIError as e:  # the API is down or the key was revoked: keep trying, the box must not idle
            self.status("terminating", f"{why}; terminate failed, retrying: {e}")
            return None
        self.status("terminated", f"{why}; instance {self.term.instance_id} terminated")
        return "terminated"

    def run(self, poll_seconds: float) -> str:
        while True:
            try:
                final = self.step()
            except UserError as e:  # e.g. S3 credentials missing: say so and keep guarding
                self.status("error", f"{e}; retrying")
                final = None
            except Exception as e:  # a guard that dies protects nothing: report it and look again next time
                self.status("error", f"{type(e).__name__}: {' '.join(str(e).split())[:300]}; retrying")
                final = None
            if final:
                return final
            time.sleep(poll_seconds)


def _requested_at(stop_file: Path, deadline: float) -> float:
    """When the stop was requested: the time the guard wrote in it, else the file's mtime (someone else wrote it),
    else (no file) the deadline."""
    try:
        return float(json.loads(stop_file.read_text())["time"])
    except (OSError, ValueError, KeyError, TypeError):
        try:
            return stop_file.stat().st_mtime
        except OSError:
            return deadline


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m job.sidecar.guard", description=__doc__.split("\n\n")[0])
    p.add_argument("--instance-id", required=True, help="this box's Lambda instance id (the only one the guard may terminate)")
    p.add_argument("--log-dir", default=contract.LOG_DIR, help="the trainer's log dir as mounted here")
    p.add_argument("--api-key-file", required=True, help="file with the Lambda API key, mode 600, mounted read-only")
    p.add_argument("--api-base", default=None, help="API base URL (default https://cloud.lambdalabs.com/api/v1)")
    p.add_argument("--terminate-when-done", action="store_true", help="terminate once training is over and its final checkpoint is safe")
    p.add_argument("--max-hours", type=float_arg(), default=None, help="stop training (with a checkpoint) after H hours, then terminate")
    p.add_argument("--s3", default=None, help="s3://BUCKET/PREFIX where the sidecar uploads checkpoints")
    p.add_argument("--s3-endpoint", default=os.environ.get("AWS_ENDPOINT_URL"), help="S3-compatible endpoint URL")
    p.add_argument("--stop-grace-minutes", type=float_arg(0), default=30.0, help="how long the trainer has to honour the stop request")
    p.add_argument("--idle-minutes", type=float_arg(0), default=0.0, help="treat training as over after this long without a log write (0: off)")
    p.add_argument("--keep-on-failure", action="store_true", help="do not terminate after a failed (non-zero) trainer exit")
    p.add_argument("--poll-seconds", type=float_arg(above=0), default=30.0, help="seconds between looks at the log dir")
    a = p.parse_args(argv)
    # Only the file: the key must not be in this container's environment, where `docker inspect` shows it.
    api = LambdaCloud(load_api_key(a.api_key_file, env={}), a.api_base)
    s3 = None
    if a.s3:
        from job.sidecar.s3 import client, parse_s3_url

        parse_s3_url(a.s3)
        s3 = client(a.s3_endpoint)
    guard = Guard(Path(a.log_dir), SelfTerminator(api, a.instance_id), terminate_when_done=a.terminate_when_done, max_hours=a.max_hours,
                  s3_url=a.s3, s3=s3, stop_grace_minutes=a.stop_grace_minutes, idle_minutes=a.idle_minutes,
                  keep_on_failure=a.keep_on_failure)
    guard.run(a.poll_seconds)


if __name__ == "__main__":
    main()
