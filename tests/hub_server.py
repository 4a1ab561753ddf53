"""A local stand-in for the Hugging Face hub's file protocol, enough for huggingface_hub's hf_hub_download and
get_hf_file_metadata: HEAD and GET /datasets/{repo}/resolve/{revision}/{file} with the hub's headers (X-Repo-Commit,
ETag = the file's sha256, as for LFS files), ranges for resumed downloads, 404 + X-Error-Code: EntryNotFound for a
missing file and 401 for a wrong token. Real files, real HTTP: point HF_ENDPOINT at `server.url`.

Faults for the tests: `fail[name]` is a list of HTTP statuses answered (with Retry-After: 0) before the file is
served; `cut[name]` sends that many bytes of the next GET of the file and then drops the connection; `corrupt[name]`
serves other bytes than the ETag announces.
"""

from __future__ import annotations

import hashlib
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"
PATH = re.compile(r"^/datasets/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>[^?]+)")


class HubServer:
    def __init__(self, repos: dict[str, Path], token: str | None = None):
        """repos: repo id -> a directory whose files the repo holds."""
        self.repos, self.token = repos, token
        self.fail: dict[str, list[int]] = {}
        self.cut: dict[str, int] = {}
        self.corrupt: set[str] = set()
        self.etags: dict[Path, str] = {}
        self.require_token = False  # True: a request without a token is refused too (a private or gated dataset)
        self.requests: list[tuple] = []  # (method, file or path, Authorization, Range, revision)
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def gets(self, name: str | None = None) -> list[tuple]:
        return [r for r in self.requests if r[0] == "GET" and (name is None or r[1] == name)]

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _answer(self, status: int, headers: dict | None = None, body: bytes = b"") -> None:
                self.send_response(status)
                for k, v in {"Content-Length": str(len(body)), **(headers or {})}.items():
                    self.send_header(k, v)
                self.end_headers()
                if body and self.command == "GET":
                    self.wfile.write(body)

            def _serve(self, body: bool) -> None:
                m = PATH.match(self.path)
                name = m["file"] if m else None
                with server.lock:
                    server.requests.append((self.command, name or self.path, self.headers.get("Authorization"), self.headers.get("Range"),
                                            m["rev"] if m else None))
                    fail = server.fail.get(name) or []
                    status = fail.pop(0) if fail else None
                anonymous = (None,) if not server.require_token else ()
                if server.token is not None and self.headers.get("Authorization") not in (*anonymous, f"Bearer {server.token}"):
                    return self._answer(401, {"X-Error-Message": "Invalid credentials in Authorization header"})
                if status is not None:
                    return self._answer(status, {"Retry-After": "0"})
                if not m or m["repo"] not in server.repos or m["rev"] not in ("main", COMMIT):
                    return self._answer(404, {"X-Error-Code": "RepoNotFound" if m else "EntryNotFound"})
                path = server.repos[m["repo"]] / name
                if not path.is_file():
                    return self._answer(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
                self._file(path, name, body)

            def _file(self, path: Path, name: str, body: bool) -> None:
                with server.lock:  # hashed once per file: HEADs come for every file, and again on a resume
                    if path not in server.etags:
                        with open(path, "rb") as f:
                            server.etags[path] = hashlib.file_digest(f, "sha256").hexdigest()
                    etag = server.etags[path]
                size = path.stat().st_size
                headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
                start, status = 0, 200
                rng = re.match(r"bytes=(\d+)-$", self.headers.get("Range") or "")
                if rng and body:
                    start, status = int(rng[1]), 206
                    headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
                with server.lock:
                    cut = server.cut.pop(name, None) if body else None
                self.send_response(status)
                for k, v in {**headers, "Content-Length": str(size - start)}.items():
                    self.send_header(k, v)
                self.end_headers()
                if not body:
                    return
                data = path.read_bytes()
                if name in server.corrupt:
                    data = data[:-2] + bytes([data[-2] ^ 1, data[-1]])
                part = data[start:]
                if cut is not None:
                    self.wfile.write(part[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(part)

        return Handler


def make_repo(d: Path, prefix: str, val_tokens: int = 30_000, shard_tokens: int = 60_000) -> list[Path]:
    """The bundled corpus as modded-nanogpt lays out its hub datasets: {prefix}_val_000000.bin, then train shards
    {prefix}_train_000001.bin, ... of shard_tokens (the last one shorter), every document preceded by EOT."""
    import numpy as np

    from job import binshard
    from job.tokenizer import EOT, encode

    corpus = Path(__file__).resolve().parents[1] / "job" / "assets" / "tinyshakespeare.txt"
    tokens = np.array([EOT] + encode(corpus.read_text()), dtype=np.uint16)
    d.mkdir(parents=True, exist_ok=True)
    cuts = [0, val_tokens, *range(val_tokens + shard_tokens, len(tokens), shard_tokens), len(tokens)]
    paths = []
    for i, (a, b) in enumerate(zip(cuts, cuts[1:], strict=False)):
        paths.append(d / f"{prefix}_{'val' if i == 0 else 'train'}_{i:06d}.bin")
        binshard.write(paths[-1], tokens[a:b])
    return paths
