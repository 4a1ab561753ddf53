"""How fast does `fab fetch-weights` bring checkpoints home, against OpenSSH's scp over the same link?

    python scripts/bench_fetch.py [--sets 3x1400,6x90] [--latency-sets 6x90] [--delay-ms 25] [--rounds 3]

Starts a throwaway OpenSSH server on loopback (tests/sshd.py). For each set (COUNTxMB: COUNT random checkpoints of MB
each, 10^6 bytes) it writes them into the server's weights dir and times, interleaved and --rounds times, into an
empty local dir each round:

  scp              `scp` of the checkpoints, as OpenSSH's defaults have it (the reference rate)
  scp, AES-GCM     the same with `-c aes128-gcm@openssh.com`, the cipher fetch-weights asks for first: how much of
                   the difference the cipher alone makes
  fetch-weights    what `fab fetch-weights` runs (infra.fetch.connect_and_fetch): connecting, the transfer, the
                   box's sha256 on a second channel, the local hash, fsync, rename and the .fetched markers (no
                   digest recorded on the box beforehand: the worst case)
  fetch, recorded  the same with the digests the S3 sidecar records (.synced-NAME) already on the box: no hashing there

then one re-run of fetch-weights into a complete dir (nothing to move). The ratio is scp's median time over
fetch-weights' (>1: fetch-weights is faster), with each round's own ratio beside it: on a shared machine the rounds
differ more than the two programs within a round. Besides wall time it reports CPU seconds, which a shared machine
disturbs less: here (this process and its children: ssh, scp) and on the box (sshd and what it ran, all reaped).

Then the --latency-sets once more over a link with a round trip of twice --delay-ms: with `tc qdisc ... netem delay`
on the loopback of a network namespace of its own where the kernel has netem (the script runs again inside it), else
through a TCP relay in this process that holds every chunk --delay-ms in each direction, for both programs alike (it
says which). The goal: fetch-weights >= 0.8x scp on every line.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import infra.fetch  # noqa: E402
import infra.ssh  # noqa: E402
from delay_relay import DelayRelay  # noqa: E402
from infra.fetch import connect_and_fetch  # noqa: E402
from infra.ssh import BULK_CIPHERS, connect  # noqa: E402
from job.errors import ArgumentParser, cli_main, float_arg, int_arg  # noqa: E402
from sshd import start_sshd  # noqa: E402


def parse_sets(text: str) -> list[tuple[int, int]]:
    sets = []
    for item in filter(None, text.split(",")):
        m = re.fullmatch(r"(\d+)x(\d+)", item.strip())
        if not m or not int(m[1]) or not int(m[2]):
            raise argparse.ArgumentTypeError(f"{item!r} is not COUNTxMB, e.g. 3x1400")
        sets.append((int(m[1]), int(m[2])))
    return sets


def make_box(d: Path, files: int, mb: int) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    per = mb * 10**6
    paths = []
    for i in range(files):
        p = d / f"model_{(i + 1) * 1000:05d}.pt"
        with open(p, "wb") as f:
            for _ in range(per // 2**20):
                f.write(os.urandom(2**20))
            f.write(os.urandom(per % 2**20))
        paths.append(p)
    return paths


def cpu_here() -> float:
    """CPU seconds of this process and the children it waited for (ssh, scp)."""
    return sum(sum(resource.getrusage(who)[:2]) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def cpu_box(pid: int) -> float:
    """CPU seconds of sshd's finished sessions and all they ran: every one is reaped up the tree to the listener."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")  # cutime, cstime


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Variant:
    """One way of bringing the checkpoints: scp, or fetch-weights with `patches` ((object, {attribute: value})) applied."""

    scp: tuple[str, ...] | None = None  # scp's own options; None: fetch-weights
    recorded: bool = False  # the S3 sidecar's .synced-NAME beside each checkpoint, so the box need not hash
    patches: tuple = ()
    fetch: object = None  # another fetch_weights (an older revision's)


@contextlib.contextmanager
def patched(patches):
    saved = [(obj, {k: getattr(obj, k) for k in attrs}) for obj, attrs in patches]
    for obj, attrs in patches:
        for k, v in attrs.items():
            setattr(obj, k, v)
    try:
        yield
    finally:
        for obj, attrs in saved:
            for k, v in attrs.items():
                setattr(obj, k, v)


MAIN = {
    "scp": Variant(scp=()),
    "scp, AES-GCM": Variant(scp=("-c", BULK_CIPHERS.split(",")[0])),
    "fetch-weights": Variant(),
    "fetch, recorded": Variant(recorded=True),
}
# OpenSSH 9's own order, for fetch-weights without its cipher preference.
OPENSSH_CIPHERS = "chacha20-poly1305@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr,aes128-gcm@openssh.com,aes256-gcm@openssh.com"


def ablations(baseline: str | None) -> dict[str, Variant]:
    """fetch-weights with one of its choices undone each, against scp and itself in the same rounds."""

    def read_allocating(self, n):  # what a plain read does: a new bytes object per read
        if self.chan is None and (chunk := self.proc.stdout.read(n)):
            self.got += len(chunk)
            return chunk
        return read(self, n)

    def piped(self):  # a checkpoint cut and padded as a log is: tail | head
        return f"{{ tail -c +{self.start + 1} {shlex.quote(self.remote)}; cat /dev/zero; }} 2>/dev/null | head -c {self.size - self.start}"

    read = infra.fetch.Stream.read
    variants = {
        "scp": MAIN["scp"],
        "fetch-weights": Variant(),
        "- chacha20 (OpenSSH's default)": Variant(patches=((infra.ssh, {"BULK_CIPHERS": OPENSSH_CIPHERS}),)),
        "- sha256sum on the box": Variant(patches=((infra.fetch, {"HASH_SCRIPT": SHA256SUM}),)),
        "- tail | head": Variant(patches=((infra.fetch.Part, {"command": piped}),)),
        "- a bytes object per read": Variant(patches=((infra.fetch.Stream, {"read": read_allocating}),)),
        "- no early write-back": Variant(patches=((infra.fetch, {"WRITE_BACK": None}),)),
        "- no fsync": Variant(patches=((infra.fetch, {"_settle": lambda p: os.replace(p.part, p.dest)}),)),
        "- paramiko channel": Variant(patches=((infra.fetch, {"openssh_command": lambda conn, cmd: None}),)),
        "- logins after connecting": Variant(fetch=infra.fetch.fetch_weights),
    }
    if baseline:
        source = subprocess.run(["git", "show", f"{baseline}:infra/fetch.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        old = sys.modules["fetch_at_baseline"] = types.ModuleType("fetch_at_baseline")  # dataclasses look their module up
        exec(compile(source, f"{baseline}:infra/fetch.py", "exec"), old.__dict__)
        # That code asked for no cipher: OpenSSH's default.
        variants[f"fetch-weights at {baseline}"] = Variant(fetch=old.fetch_weights, patches=((infra.ssh, {"BULK_CIPHERS": OPENSSH_CIPHERS}),))
    return variants


SHA256SUM = 'for f in {files}; do d=$(sha256sum < "$f") || d=-; echo "${{d%% *}}"; done 2>/dev/null'


class Bench:
    def __init__(self, srv, work: Path, port: int, known: Path, rounds: int):
        self.srv, self.work, self.port, self.known, self.rounds = srv, work, port, known, rounds

    def timed(self, fn) -> tuple[float, float, float]:
        """(wall, CPU here, CPU on the box) of fn(); the box's sessions are reaped a moment after they end."""
        here, box, t = cpu_here(), cpu_box(self.srv.proc.pid), time.perf_counter()
        fn()
        wall = time.perf_counter() - t
        time.sleep(0.5)
        return wall, cpu_here() - here, cpu_box(self.srv.proc.pid) - box

    def run(self, files: int, mb: int, link: str, variants: dict[str, Variant]) -> None:
        box = self.work / "box" / "model_weights"
        ckpts = make_box(box, files, mb)
        size = sum(c.stat().st_size for c in ckpts)
        digests = {c.name: sha256(c) for c in ckpts}
        dest = self.work / "local"
        scp = ["scp", "-q", "-i", self.srv.key_path, "-o", f"UserKnownHostsFile={self.known}", "-o", "StrictHostKeyChecking=yes",
               "-P", str(self.port)]
        sources = [f"{self.srv.user}@127.0.0.1:{c}" for c in ckpts]

        def runner(v: Variant):
            if v.scp is not None:
                return lambda: subprocess.run([*scp, *v.scp, *sources, str(dest)], check=True)

            def fetch():  # connecting included, as scp's is: what `fab fetch-weights` runs
                link = partial(connect, f"{self.srv.user}@127.0.0.1", port=self.port, key=self.srv.key_path, known_hosts=str(self.known))
                with patched(v.patches):
                    if v.fetch is None:
                        connect_and_fetch(link, str(box), dest, progress=False)
                        return
                    with link() as conn:
                        v.fetch(conn, str(box), dest, progress=False)

            return fetch

        res: dict[str, list[tuple[float, float, float]]] = {k: [] for k in variants}
        rerun = None
        for i in range(self.rounds):
            for name, v in variants.items():
                for marker in box.glob(".*-model_*"):
                    marker.unlink()  # no digest recorded on the box: fetch-weights hashes there itself
                if v.recorded:
                    for c in ckpts:  # what the S3 sidecar leaves beside each checkpoint it uploaded
                        (box / f".synced-{c.name}").write_text(json.dumps({"sha256": digests[c.name], "size": c.stat().st_size}))
                dest.mkdir()
                res[name].append(self.timed(runner(v)))
                assert all(sha256(dest / c.name) == digests[c.name] for c in ckpts), f"{name}: a copy differs from the box's file"
                if name == "fetch-weights" and i == self.rounds - 1:
                    rerun = self.timed(runner(v))[0]
                shutil.rmtree(dest)
        shutil.rmtree(box)
        print(f"{files} x {mb} MB checkpoints ({size / 1e6:.0f} MB), {link}, {self.rounds} rounds, interleaved")
        scp_wall = [r[0] for r in res["scp"]]
        for name, rs in res.items():
            wall = [r[0] for r in rs]
            ratio = statistics.median(scp_wall) / statistics.median(wall)
            rounds = "/".join(f"{s / w:.2f}" for s, w in zip(scp_wall, wall, strict=True))
            print(f"  {name:30s} {min(wall):6.2f}-{max(wall):6.2f} s   median {size / statistics.median(wall) / 1e6:6.1f} MB/s   "
                  f"{ratio:.2f}x scp (rounds {rounds})   CPU here {statistics.median(r[1] for r in rs):5.2f} s, "
                  f"box {statistics.median(r[2] for r in rs):5.2f} s")
        if rerun is not None:
            print(f"  re-run with nothing to move: {rerun:.2f} s")
        sys.stdout.flush()


def netem_works() -> str | None:
    """None where a network namespace's loopback takes a netem qdisc here, else why not."""
    if shutil.which("unshare") is None or shutil.which("tc") is None:
        return "no unshare or tc"
    probe = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up && tc qdisc add dev lo root netem delay 1ms"],
                           capture_output=True, text=True)
    return None if probe.returncode == 0 else " ".join(probe.stderr.split()) or f"exit status {probe.returncode}"


def bench_link(sets, rounds: int, delay_ms: float, relay: bool, variants: dict[str, Variant]) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-fetch-"))
    srv = start_sshd(work / "sshd")
    try:
        port = DelayRelay(srv.port, delay_ms / 1000).port if relay else srv.port
        known = work / "known_hosts"  # the relay's port is another "host" for known_hosts
        known.write_text(Path(srv.known_hosts_path).read_text().replace(f"]:{srv.port} ", f"]:{port} "))
        if not delay_ms:
            link = "loopback"
        elif relay:
            link = f"loopback + {2 * delay_ms:g} ms round trip (relay in this process; its CPU counts as here)"
        else:
            link = f"loopback + {2 * delay_ms:g} ms round trip (netem)"
        bench = Bench(srv, work, port, known, rounds)
        for files, mb in sets:
            bench.run(files, mb, link, variants)
    finally:
        srv.stop()
        shutil.rmtree(work, ignore_errors=True)


@cli_main
def main() -> None:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sets", type=parse_sets, default="3x1400,6x90", help="COUNTxMB,... over loopback (default 3x1400,6x90)")
    p.add_argument("--latency-sets", type=parse_sets, default="6x90", help="COUNTxMB,... over the slow link ('' for none)")
    p.add_argument("--delay-ms", type=float_arg(0), default=25.0, help="one-way delay of the slow link (round trip: twice this)")
    p.add_argument("--rounds", type=int_arg(1), default=3)
    p.add_argument("--ablations", action="store_true",
                   help="instead: over --sets, fetch-weights with each of its choices undone in turn (cipher, hasher, tail | head, "
                        "reads, write-back, fsync, OpenSSH's client, early logins), against scp")
    p.add_argument("--baseline", metavar="REV", help="with --ablations: also fetch-weights as infra/fetch.py was at git revision REV")
    p.add_argument("--in-netns", action="store_true", help=argparse.SUPPRESS)  # the re-run inside the namespace
    args = p.parse_args()
    if args.ablations:
        bench_link(args.sets, args.rounds, 0, relay=False, variants=ablations(args.baseline))
        return
    if args.in_netns:
        bench_link(args.latency_sets, args.rounds, args.delay_ms, relay=False, variants=MAIN)
        return
    bench_link(args.sets, args.rounds, 0, relay=False, variants=MAIN)
    if not args.latency_sets or not args.delay_ms:
        return
    why = netem_works()
    if why is not None:
        print(f"netem is not available here ({why}): the slow link is a relay in this process")
        bench_link(args.latency_sets, args.rounds, args.delay_ms, relay=True, variants=MAIN)
        return
    sets = ",".join(f"{n}x{mb}" for n, mb in args.latency_sets)
    again = " ".join(shlex.quote(a) for a in [sys.executable, __file__, "--in-netns", "--latency-sets", sets, "--delay-ms", f"{args.delay_ms:g}",
                                             "--rounds", str(args.rounds)])
    inner = f"ip link set lo up && tc qdisc add dev lo root netem delay {args.delay_ms:g}ms && exec {again}"
    subprocess.run(["unshare", "-n", "sh", "-c", inner], check=True)


if __name__ == "__main__":
    main()
