"""How fast does `fab fetch-weights` bring checkpoints home, against OpenSSH's scp over the same link?

    python scripts/bench_fetch.py [--files 7] [--mb 582] [--rounds 3] [--delay-ms 0]

Starts a throwaway OpenSSH server on loopback (tests/sshd.py), writes --files random checkpoints of --mb in all
into its weights dir, and times, interleaved and --rounds times, into an empty local dir each round:

  scp            `scp` of the checkpoints (OpenSSH, C; the reference rate)
  fetch-weights  connect + infra.fetch.fetch_weights: the transfer, the box's sha256 on a second channel, the
                 local hash, fsync, rename and the .fetched markers (no digest recorded on the box beforehand:
                 the worst case)
  fetch, recorded  the same with the digests the S3 sidecar records (.synced-NAME) already on the box: no hashing there

then one re-run of fetch-weights into a complete dir (nothing to move). Besides wall time it reports the CPU
seconds of this side (this process and its children: ssh), which a shared machine disturbs less. --delay-ms D puts a TCP relay between the
client and sshd that holds every chunk D ms in each direction (a 2*D ms round trip), for both programs alike; it is
the stand-in for `tc qdisc ... netem delay` where the kernel has no netem. The goal: fetch-weights >= 0.8x scp.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from infra.fetch import fetch_weights  # noqa: E402
from infra.ssh import connect  # noqa: E402
from sshd import start_sshd  # noqa: E402


class DelayRelay:
    """127.0.0.1:port -> target, every chunk delivered `delay` seconds after it arrived, order kept, both directions."""

    def __init__(self, target_port: int, delay: float):
        self.target_port, self.delay = target_port, delay
        self.loop = asyncio.new_event_loop()
        # Connections the programs drop or leave open when the script ends are no finding: nothing to log about them.
        self.loop.set_exception_handler(lambda loop, context: None)
        ready = threading.Event()
        threading.Thread(target=self._serve, args=(ready,), daemon=True).start()
        ready.wait()

    def _serve(self, ready):
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def _client(self, reader, writer):
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(self._pipe(reader, up_w), self._pipe(up_r, writer), return_exceptions=True)
        for w in (up_w, writer):
            w.close()

    async def _pipe(self, reader, writer):
        queue: asyncio.Queue = asyncio.Queue()

        async def deliver():
            while (item := await queue.get()) is not None:
                due, data = item
                await asyncio.sleep(max(0.0, due - self.loop.time()))
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()  # a half-close, passed on: the other direction goes on

        task = asyncio.ensure_future(deliver())
        try:
            while data := await reader.read(1 << 20):
                queue.put_nowait((self.loop.time() + self.delay, data))
        except ConnectionError:
            pass  # the other side went away: deliver what came, then end
        queue.put_nowait(None)
        await task


def make_box(d: Path, files: int, total_mb: int) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    per = total_mb * 10**6 // files
    paths = []
    for i in range(files):
        p = d / f"model_{(i + 1) * 1000:05d}.pt"
        with open(p, "wb") as f:
            for _ in range(per // 2**20):
                f.write(os.urandom(2**20))
            f.write(os.urandom(per % 2**20))
        paths.append(p)
    return paths


def timed(fn, cpu: list | None = None) -> float:
    """Wall seconds of fn(); its CPU seconds here (this process and the children it waited for) go to `cpu`."""
    before = cpu_seconds()
    t = time.perf_counter()
    fn()
    wall = time.perf_counter() - t
    if cpu is not None:
        cpu.append(cpu_seconds() - before)
    return wall


def cpu_seconds() -> float:
    return sum(sum(resource.getrusage(who)[:2]) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--files", type=int, default=7)
    p.add_argument("--mb", type=int, default=582, help="total size of the checkpoints, MB (10^6 bytes)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay of the relay (round trip: twice this)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-fetch-"))
    srv = start_sshd(work / "sshd")
    try:
        box = work / "box" / "model_weights"
        ckpts = make_box(box, args.files, args.mb)
        size = sum(c.stat().st_size for c in ckpts)
        relay = DelayRelay(srv.port, args.delay_ms / 1000) if args.delay_ms else None
        port = relay.port if relay else srv.port
        known = work / "known_hosts"  # the relay's port is another "host" for known_hosts
        known.write_text(Path(srv.known_hosts_path).read_text().replace(f"]:{srv.port} ", f"]:{port} "))
        scp = ["scp", "-q", "-i", srv.key_path, "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes", "-P", str(port)]
        names = ("scp", "fetch-weights", "fetch, recorded")
        times: dict[str, list[float]] = {k: [] for k in names}
        cpu: dict[str, list[float]] = {k: [] for k in names}
        dest = work / "local"

        def fetch():  # connecting included, as scp's is
            with connect(f"{srv.user}@127.0.0.1", port=port, key=srv.key_path, known_hosts=str(known)) as conn:
                fetch_weights(conn, str(box), dest, progress=False)

        for i in range(args.rounds):
            dest.mkdir()
            times["scp"].append(timed(lambda: subprocess.run([*scp, *(f"{srv.user}@127.0.0.1:{c}" for c in ckpts), str(dest)], check=True),
                                      cpu["scp"]))
            shutil.rmtree(dest)
            for marker in box.glob(".*-model_*"):
                marker.unlink()  # no digest recorded on the box: fetch-weights hashes there itself
            times["fetch-weights"].append(timed(fetch, cpu["fetch-weights"]))
            assert all((dest / c.name).read_bytes() == c.read_bytes() for c in ckpts)
            if i == args.rounds - 1:
                rerun = timed(fetch)
            for c in ckpts:  # what the S3 sidecar leaves beside each checkpoint it uploaded
                (box / f".synced-{c.name}").write_text(json.dumps({"sha256": hashlib.sha256(c.read_bytes()).hexdigest(), "size": c.stat().st_size}))
            shutil.rmtree(dest)
            times["fetch, recorded"].append(timed(fetch, cpu["fetch, recorded"]))
            shutil.rmtree(dest)
        link = f"loopback + {2 * args.delay_ms:g} ms round trip (relay)" if args.delay_ms else "loopback"
        print(f"{args.files} checkpoints, {size / 1e6:.0f} MB, {link}, {args.rounds} rounds")
        rate = {k: size / statistics.median(v) / 1e6 for k, v in times.items()}
        for k, v in times.items():
            print(f"  {k:16s} {min(v):6.2f}-{max(v):6.2f} s   median {rate[k]:6.1f} MB/s   {rate[k] / rate['scp']:.2f}x scp   "
                  f"CPU here {statistics.median(cpu[k]):5.2f} s")
        print(f"  re-run with nothing to move: {rerun:.2f} s")
    finally:
        srv.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
