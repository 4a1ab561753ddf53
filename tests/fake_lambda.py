"""A fake Lambda Cloud API v1 for tests: a real HTTP server on 127.0.0.1 (a thread in the test process, reachable from
subprocesses) that answers the endpoints we use with the shapes of Lambda's API description (see job/sidecar/lambda_cloud.py)
and checks every request it gets: the auth header, the JSON body's field names and types, the launch constraints.
Anything off is both refused (as Lambda would) and recorded in `problems`, which a test asserts is empty.

    with FakeLambda(boot_polls=2) as api:          # api.url -> http://127.0.0.1:PORT/api/v1
        api.fail_next("POST", "/instance-operations/launch", 429)
        ...
"""

from __future__ import annotations

import base64
import json
import re
import threading
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TEST_KEY = "secret_test-api-key_0f9e8d7c6b5a4"  # distinctive, so a leak is easy to grep for

H100 = "gpu_8x_h100_sxm5"
A100 = "gpu_8x_a100_80gb_sxm4"
A10 = "gpu_1x_a10"


def _region(name: str) -> dict:
    return {"name": name, "description": {"us-east-1": "Virginia, USA", "us-west-1": "California, USA", "us-south-1": "Texas, USA"}.get(name, name)}


def default_types() -> dict:
    def entry(name, desc, gpu, cents, gpus, regions):
        return {"instance_type": {"name": name, "description": desc, "gpu_description": gpu, "price_cents_per_hour": cents,
                                  "specs": {"vcpus": 26 * gpus, "memory_gib": 225 * gpus, "storage_gib": 2750 if gpus == 8 else 512, "gpus": gpus}},
                "regions_with_capacity_available": [_region(r) for r in regions]}

    return {H100: entry(H100, "8x H100 (80 GB SXM5)", "H100 (80 GB SXM5)", 2392, 8, ["us-west-1", "us-east-1"]),
            A100: entry(A100, "8x A100 (80 GB SXM4)", "A100 (80 GB SXM4)", 1432, 8, []),
            A10: entry(A10, "1x A10 (24 GB PCIe)", "A10 (24 GB PCIe)", 75, 1, ["us-south-1"])}


@dataclass
class Request:
    method: str
    path: str
    auth_scheme: str  # "Bearer", "Basic" or "" (the key itself is never stored)
    auth_ok: bool
    body: object


class FakeLambda:
    def __init__(self, api_key: str = TEST_KEY, ip: str = "127.0.0.1", boot_polls: int = 2, quota: int | None = None):
        self.api_key, self.ip, self.boot_polls, self.quota = api_key, ip, boot_polls, quota
        self.types = default_types()
        self.ssh_keys = [{"id": "6f1e" + "0" * 28, "name": "laptop", "public_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAItest laptop"}]
        self.file_systems = [{"id": "9a2b" + "0" * 28, "name": "fineweb", "mount_point": "/home/ubuntu/fineweb",
                              "created": "2026-11-20T10:00:00+00:00", "created_by": {"id": "u1", "email": "me@example.com", "status": "active"},
                              "is_in_use": False, "bytes_used": 20 * 2**30, "region": _region("us-east-1")}]
        self.instances: dict[str, dict] = {}
        self.polls: dict[str, int] = {}
        self.next_status = "active"  # what booting instances turn into ("unhealthy" to test that path)
        self.requests: list[Request] = []
        self.problems: list[str] = []
        self._canned: list[list] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # --- control ------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/api/v1"

    def start(self) -> FakeLambda:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                fake._handle(self, "GET")

            def do_POST(self):
                fake._handle(self, "POST")

            def log_message(self, *args):  # keep test output clean
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def fail_next(self, method: str, path: str, status: int, code: str = "global/unknown", message: str = "", times: int = 1,
                  retry_after: str | None = None, served: bool = False) -> None:
        """The next `times` requests to method+path get this error instead of being served (with `served`, after
        being served: the reply is lost, as when a connection drops after the launch happened)."""
        self._canned.append([method, path, status, code, message or f"HTTP {status}", times, retry_after, served])

    def calls(self, method: str, path: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and r.path == path]

    def add_instance(self, name: str, type_name: str = H100, region: str = "us-east-1", status: str = "active") -> dict:
        iid = uuid.uuid4().hex
        self.instances[iid] = self._instance(iid, name, type_name, region, [self.ssh_keys[0]["name"]], [], status)
        return self.instances[iid]

    # --- protocol -----------------------------------------------------------------------------------
    def _instance(self, iid, name, type_name, region, keys, fss, status) -> dict:
        t = self.types[type_name]["instance_type"]
        return {"id": iid, "name": name, "ip": self.ip if status == "active" else None, "status": status, "ssh_key_names": keys,
                "file_system_names": fss, "region": _region(region), "instance_type": t,
                "hostname": f"{self.ip.replace('.', '-')}.cloud.lambdalabs.com" if status == "active" else None,
                "jupyter_token": None, "jupyter_url": None}

    def _check_auth(self, header: str) -> tuple[str, bool]:
        scheme, _, value = header.partition(" ")
        if scheme == "Bearer":
            return scheme, value == self.api_key
        if scheme == "Basic":  # the documented alternative: base64 of "KEY:" (curl -u KEY:)
            try:
                return scheme, base64.b64decode(value).decode() in (f"{self.api_key}:", self.api_key)
            except ValueError:
                return scheme, False
        return "", False

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        path = h.path.split("?")[0]
        prefix = "/api/v1"
        if not path.startswith(prefix):
            return self._send(h, 404, {"error": {"code": "global/object-does-not-exist", "message": "Not found"}})
        path = path[len(prefix):]
        body = None
        length = int(h.headers.get("Content-Length") or 0)
        if method == "POST":
            raw = h.rfile.read(length)
            if "application/json" not in (h.headers.get("Content-Type") or ""):
                self.problems.append(f"{method} {path}: Content-Type {h.headers.get('Content-Type')!r}, not JSON")
            try:
                body = json.loads(raw or b"null")
            except ValueError:
                self.problems.append(f"{method} {path}: body is not JSON")
        elif length:
            self.problems.append(f"{method} {path}: unexpected request body")
        scheme, ok = self._check_auth(h.headers.get("Authorization", ""))
        with self._lock:
            self.requests.append(Request(method, path, scheme, ok, body))
            if not ok:
                return self._send(h, 401, _err("global/invalid-api-key", "API key was invalid, expired, or deleted.",
                                               "Check your API key or create a new one, then try again."))
            for c in self._canned:
                if c[0] == method and c[1] == path and c[5] > 0:
                    c[5] -= 1
                    if c[7]:
                        self._route(method, path, body)
                    return self._send(h, c[2], _err(c[3], c[4]), {"Retry-After": c[6]} if c[6] is not None else {})
            status, payload = self._route(method, path, body)
        self._send(h, status, payload)

    def _send(self, h, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    def _route(self, method: str, path: str, body) -> tuple[int, dict]:
        if method == "GET" and path == "/instance-types":
            return 200, {"data": self.types}
        if method == "GET" and path == "/ssh-keys":
            return 200, {"data": self.ssh_keys}
        if method == "GET" and path == "/file-systems":
            return 200, {"data": self.file_systems}
        if method == "GET" and path == "/instances":
            return 200, {"data": [self._advance(i) for i in list(self.instances) if self.instances[i]["status"] != "terminated"]}
        if method == "GET" and path.startswith("/instances/"):
            iid = path.split("/")[2]
            if iid not in self.instances:
                return 404, _err("global/object-does-not-exist", "Specified instance does not exist.")
            self.polls[iid] = self.polls.get(iid, 0) + 1
            return 200, {"data": self._advance(iid)}
        if method == "POST" and path == "/filesystems":
            return self._create_file_system(body)
        if method == "POST" and path == "/instance-operations/launch":
            return self._launch(body)
        if method == "POST" and path == "/instance-operations/terminate":
            return self._terminate(body)
        self.problems.append(f"{method} {path}: not an endpoint we expect to be called")
        return 404, _err("global/object-does-not-exist", "Not found")

    def _advance(self, iid: str) -> dict:
        inst = self.instances[iid]
        if inst["status"] == "booting" and self.polls.get(iid, 0) > self.boot_polls:
            inst.update(self._instance(iid, inst["name"], inst["instance_type"]["name"], inst["region"]["name"], inst["ssh_key_names"],
                                       inst["file_system_names"], self.next_status))
        return inst

    def _bad(self, msg: str) -> tuple[int, dict]:
        self.problems.append(msg)
        return 400, _err("global/invalid-parameters", msg)

    def regions(self) -> set[str]:
        """The regions Lambda knows: every one an instance type lists, plus those file systems live in."""
        return ({r["name"] for e in self.types.values() for r in e["regions_with_capacity_available"]}
                | {f["region"]["name"] for f in self.file_systems} | {"us-east-1", "us-west-1", "us-south-1"})

    def _create_file_system(self, body) -> tuple[int, dict]:
        # The API description's FilesystemCreateRequest: name and region, both required; its 400s are a bad name or
        # region (invalid-parameters, with field_errors) and a name already taken (duplicate).
        if not isinstance(body, dict) or set(body) != {"name", "region"} or not all(isinstance(v, str) for v in body.values()):
            return self._bad(f"create file system: body must be {{'name': str, 'region': str}}, got {body!r}")
        name, region = body["name"], body["region"]
        if not (len(name) <= 60 and re.fullmatch(r"[a-zA-Z]+[0-9a-zA-Z-]*", name)):
            return 400, {**_err("global/invalid-parameters", "Invalid filesystem name."),
                         "field_errors": {"name": {"code": "global/invalid-parameters",
                                                   "message": "must be 1-60 letters, numbers and hyphens, starting with a letter"}}}
        if region not in self.regions():
            return 400, {**_err("global/invalid-parameters", "Invalid region."),
                         "field_errors": {"region": {"code": "global/invalid-parameters", "message": "unknown region"}}}
        if any(f["name"] == name for f in self.file_systems):
            return 400, _err("global/duplicate", "A filesystem with this name already exists.", "Choose a different name.")
        fs = {"id": uuid.uuid4().hex, "name": name, "mount_point": f"/lambda/nfs/{name}", "created": "2026-12-01T10:00:00+00:00",
              "created_by": {"id": "u1", "email": "me@example.com", "status": "active"}, "is_in_use": False, "bytes_used": 0,
              "region": _region(region)}
        self.file_systems.append(fs)
        return 200, {"data": fs}

    def _launch(self, body) -> tuple[int, dict]:
        allowed = {"region_name", "instance_type_name", "ssh_key_names", "file_system_names", "quantity", "name"}
        if not isinstance(body, dict):
            return self._bad("launch: body is not a JSON object")
        if set(body) - allowed:
            return self._bad(f"launch: unknown fields {sorted(set(body) - allowed)}")
        for f in ("region_name", "instance_type_name", "ssh_key_names"):
            if f not in body:
                return self._bad(f"launch: missing required field {f}")
        keys, fss = body["ssh_key_names"], body.get("file_system_names", [])
        if not (isinstance(keys, list) and len(keys) == 1 and isinstance(keys[0], str)):
            return self._bad("launch: ssh_key_names must be a list of exactly one name")
        if not (isinstance(fss, list) and len(fss) <= 1 and all(isinstance(x, str) for x in fss)):
            return self._bad("launch: file_system_names must be a list of at most one name")
        if body.get("quantity", 1) != 1:
            return self._bad("launch: quantity must be 1")
        name = body.get("name")
        if name is not None and not (isinstance(name, str) and 1 <= len(name) <= 64):
            return self._bad("launch: name must be 1-64 characters")
        t, region = body["instance_type_name"], body["region_name"]
        if t not in self.types:
            return 400, _err("global/invalid-parameters", "Invalid instance type.")
        if keys[0] not in {k["name"] for k in self.ssh_keys}:
            return 400, _err("global/invalid-parameters", "Invalid SSH key name(s).", "Check the names of your SSH keys.")
        if fss:
            fs = next((f for f in self.file_systems if f["name"] == fss[0]), None)
            if fs is None:
                return 400, _err("global/invalid-parameters", "Invalid file system name(s).")
            if fs["region"]["name"] != region:
                return 400, _err("instance-operations/launch/file-system-in-wrong-region", "File system is in a different region.")
        if self.quota is not None and sum(i["status"] != "terminated" for i in self.instances.values()) >= self.quota:
            return 400, _err("global/quota-exceeded", "Quota exceeded for this instance type.", "Contact support to increase your quota.")
        if region not in {r["name"] for r in self.types[t]["regions_with_capacity_available"]}:
            return 400, _err("instance-operations/launch/insufficient-capacity", "Not enough capacity to fulfill launch request.",
                             "Choose an instance type with more availability, or try again later.")
        iid = uuid.uuid4().hex
        self.instances[iid] = self._instance(iid, name, t, region, keys, fss, "booting")
        return 200, {"data": {"instance_ids": [iid]}}

    def _terminate(self, body) -> tuple[int, dict]:
        if not isinstance(body, dict) or set(body) != {"instance_ids"} or not isinstance(body["instance_ids"], list):
            return self._bad(f"terminate: body must be {{'instance_ids': [...]}}, got {body!r}")
        unknown = [i for i in body["instance_ids"] if i not in self.instances or self.instances[i]["status"] == "terminated"]
        if unknown:
            return 404, _err("global/object-does-not-exist", "Specified instance does not exist.")
        done = []
        for iid in body["instance_ids"]:
            self.instances[iid]["status"] = "terminated"
            done.append(self.instances[iid])
        return 200, {"data": {"terminated_instances": done}}


def _err(code: str, message: str, suggestion: str | None = None) -> dict:
    e = {"code": code, "message": message}
    if suggestion:
        e["suggestion"] = suggestion
    return {"error": e}
