"""A small Lambda Cloud API v1 client on `requests`: timeouts, retries with backoff, one-line errors, and a key that
never leaves the Authorization header.

Everything here follows Lambda's published API description (OpenAPI "Lambda Cloud API" 1.5.x, served at
https://cloud.lambdalabs.com/api/v1/docs, browsable at https://docs-api.lambda.ai/api/cloud):
- base URL https://cloud.lambdalabs.com/api/v1; every success body is `{"data": PAYLOAD}`, every error body is
  `{"error": {"code", "message", "suggestion"?}, "field_errors"?: {...}}`; callers should branch on `code`, not on the
  message text, which Lambda says may change.
- auth: `Authorization: Bearer <key>` (recommended there; Basic with the key as user name is also accepted).
- GET /instance-types -> {name: {"instance_type": {name, description, gpu_description, price_cents_per_hour,
  specs: {vcpus, memory_gib, storage_gib, gpus}}, "regions_with_capacity_available": [{name, description}]}}
- POST /instance-operations/launch {region_name, instance_type_name, ssh_key_names (exactly one),
  file_system_names (at most one), quantity, name} -> {"instance_ids": [...]}
- GET /instances -> [instance]; GET /instances/{id} -> instance {id, name, ip, status (booting | active | unhealthy |
  terminating | terminated), ssh_key_names, file_system_names, region {name}, instance_type {...}, hostname}
- POST /instance-operations/terminate {instance_ids} -> {"terminated_instances": [instance]}
- GET /ssh-keys -> [{id, name, public_key}]; GET /file-systems -> [{id, name, mount_point, region {name}, is_in_use, ...}]
- POST /filesystems {name (1-60 characters, ^[a-zA-Z]+[0-9a-zA-Z-]*$), region} -> the new file system (same shape as
  the list's items); refused with global/duplicate when the name is taken, global/invalid-parameters for a bad name or
  region, global/quota-exceeded. Creating and listing are spelled differently (`filesystems`, `file-systems`) there.
- rate limits: about one request per second, and launch at most once per 12 s; a 429 means "slow down".

The key comes from LAMBDA_API_KEY or a file only its owner can read (default ~/.config/lambda/api_key). It is kept in
one attribute, sent only as a header, and scrubbed from any text this module builds from a server reply.

Two sides use this client: the laptop (provisioning and the fab tasks, through infra.cloud) and the cost guard on
the box (job.sidecar.guard, which only terminates its own instance). It lives in job/sidecar/ because the image
installs job/ and not infra/; it imports neither torch nor numpy, so the laptop's launcher can import it too.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import requests

from job.errors import UserError, http_url

DEFAULT_BASE_URL = "https://cloud.lambdalabs.com/api/v1"
BASE_URL_ENV = "LAMBDA_API_BASE"
KEY_ENV = "LAMBDA_API_KEY"
DEFAULT_KEY_FILE = "~/.config/lambda/api_key"
KEYS_PAGE = "https://cloud.lambdalabs.com/api-keys"

# Error codes from the API description's errorCode enum (plus the `provider/` prefix its overview mentions).
INVALID_KEY = "global/invalid-api-key"
ACCOUNT_INACTIVE = "global/account-inactive"
INVALID_PARAMETERS = "global/invalid-parameters"
NOT_FOUND = "global/object-does-not-exist"
QUOTA = "global/quota-exceeded"
DUPLICATE = "global/duplicate"
NO_CAPACITY = "instance-operations/launch/insufficient-capacity"
FS_WRONG_REGION = "instance-operations/launch/file-system-in-wrong-region"
FS_UNSUPPORTED = "instance-operations/launch/file-systems-not-supported"


class LambdaAPIError(UserError):
    """An error reply from the API (after retries), already phrased as one line. `code` is Lambda's error code."""

    def __init__(self, line: str, code: str = "", status: int = 0, message: str = ""):
        super().__init__(line)
        self.code, self.status, self.message = code, status, message


def load_api_key(key_file: str | None = None, env: dict | None = None) -> str:
    """LAMBDA_API_KEY if set, else the key file; a file others could read is refused rather than trusted."""
    env = os.environ if env is None else env
    if env.get(KEY_ENV, "").strip():
        return _checked_key(env[KEY_ENV].strip(), KEY_ENV)
    path = Path(os.path.expanduser(key_file or DEFAULT_KEY_FILE))
    if not path.is_file():
        raise UserError(f"no Lambda Cloud API key: set {KEY_ENV} or save the key from {KEYS_PAGE} in {path} (chmod 600 {path})")
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UserError(f"{path} is readable by other users (mode {stat.S_IMODE(mode):o}): run `chmod 600 {path}` and retry")
    key = path.read_bytes().decode("utf-8", "replace").strip()  # bytes that are not text: refused below, never shown
    if not key or "\n" in key:
        raise UserError(f"{path} must hold exactly one API key on one line (from {KEYS_PAGE})")
    return _checked_key(key, str(path))


def _checked_key(key: str, where: str) -> str:
    """An API key is printable ASCII without spaces (it goes into an HTTP header); the key itself is never shown."""
    if not all("!" <= c <= "~" for c in key):
        raise UserError(f"{where} holds a character an API key cannot have (not printable ASCII, or a space): copy the key "
                        f"again from {KEYS_PAGE}")
    return key


class _Bearer(requests.auth.AuthBase):
    """Adds the header at send time, so the key is in no session default, no repr and no exception text."""

    def __init__(self, key: str):
        self._key = key

    def __call__(self, r):
        r.headers["Authorization"] = f"Bearer {self._key}"
        return r

    def __repr__(self):
        return "<Bearer hidden>"


def check_base_url(url: str) -> str:
    """The API base URL, or one line when it is not an http(s) URL requests could use (a typo, a missing scheme)."""
    return http_url(url, "the Lambda API base URL", f"pass --api-base (or set {BASE_URL_ENV}) like {DEFAULT_BASE_URL}, or leave both unset")


class LambdaCloud:
    """One method per endpoint; each returns the reply's `data`. Retries 429, 5xx and connection errors with
    exponential backoff (Retry-After honoured), except where a retry could launch a second billed box."""

    def __init__(self, api_key: str, base_url: str | None = None, *, timeout: tuple[float, float] = (5.0, 30.0), tries: int = 5,
                 backoff: float = 1.0, max_backoff: float = 30.0, sleep=time.sleep):
        if not api_key:
            raise UserError(f"empty Lambda Cloud API key: set {KEY_ENV} or fill the key file")
        self.base_url = check_base_url(base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")
        self._auth = _Bearer(api_key)
        self.timeout, self.tries, self.backoff, self.max_backoff, self._sleep = timeout, max(1, tries), backoff, max_backoff, sleep
        self.session = requests.Session()
        self.session.headers.update({"Accept": "application/json", "User-Agent": "nanogpt-cloud"})

    def __repr__(self):
        return f"LambdaCloud({self.base_url!r})"

    @classmethod
    def from_env(cls, key_file: str | None = None, base_url: str | None = None, **kw) -> LambdaCloud:
        return cls(load_api_key(key_file), base_url, **kw)

    # --- endpoints -------------------------------------------------------------------------------------
    def instance_types(self) -> dict:
        return self._call("GET", "/instance-types")

    def instances(self) -> list[dict]:
        return self._call("GET", "/instances")

    def instance(self, instance_id: str) -> dict:
        return self._call("GET", f"/instances/{_path_id(instance_id)}")

    def ssh_keys(self) -> list[dict]:
        return self._call("GET", "/ssh-keys")

    def file_systems(self) -> list[dict]:
        return self._call("GET", "/file-systems")

    def create_file_system(self, name: str, region: str) -> dict:
        """Create an empty file system. Retried like a read: a retry after a lost reply answers global/duplicate,
        which the caller settles by listing (infra.cloud.ensure_file_system), so no second file system appears."""
        try:
            return self._call("POST", "/filesystems", {"name": name, "region": region})
        except LambdaAPIError as e:
            msg = e.message.lower()
            if e.code == INVALID_PARAMETERS and "region" in msg:
                line = f"Lambda Cloud cannot create file system {name!r} in {region} ({e.message}): pick another region with --region"
            elif e.code == INVALID_PARAMETERS:
                line = (f"Lambda Cloud refused the file system name {name!r} ({e.message}): use 1-60 letters, digits and hyphens, "
                        "starting with a letter")
            else:
                raise
            raise LambdaAPIError(line, e.code, e.status, e.message) from None

    def launch(self, region_name: str, instance_type_name: str, ssh_key_name: str, name: str,
               file_system_name: str | None = None) -> list[str]:
        """Launch one instance named `name`; returns its id in a list, as the API does.

        Not blindly retried: after a 5xx or a lost connection the launch may have happened, so we look for an
        instance with our (unique) name first and retry only when there is none. A 429 was refused outright and is
        retried like any other call."""
        body = {"region_name": region_name, "instance_type_name": instance_type_name, "ssh_key_names": [ssh_key_name],
                "file_system_names": [file_system_name] if file_system_name else [], "quantity": 1, "name": name}
        for attempt in range(self.tries):
            try:
                return self._call("POST", "/instance-operations/launch", body, unsafe=True)["instance_ids"]
            except LambdaAPIError as e:
                raise self._launch_error(e, body, self._capacity_now(e, body)) from None
            except _Ambiguous as e:
                found = [i["id"] for i in self.instances() if i.get("name") == name and i.get("status") != "terminated"]
                if found:
                    return found
                if attempt == self.tries - 1:
                    raise LambdaAPIError(f"launching {instance_type_name} in {region_name} failed ({e}) and no instance named {name} "
                                         "appeared: try again in a few minutes") from None
                self._sleep(self._delay(attempt, None))
        raise AssertionError("unreachable")

    def _capacity_now(self, e: LambdaAPIError, body: dict) -> str | None:
        """After an insufficient-capacity refusal, where there is capacity now (None when that cannot be learned)."""
        if e.code != NO_CAPACITY:
            return None
        try:
            types = self.instance_types()
        except UserError:
            return None
        # The pair just refused is left out even if the list still offers it: the list lags behind launches.
        return capacity_summary(types, exclude=(body["instance_type_name"], body["region_name"]))

    @staticmethod
    def _launch_error(e: LambdaAPIError, body: dict, capacity: str | None = None) -> LambdaAPIError:
        """The same error with the type, region, key or file system it is about, where the code says which."""
        t, region, key = body["instance_type_name"], body["region_name"], body["ssh_key_names"][0]
        fs = (body["file_system_names"] or [""])[0]
        msg = e.message.lower()
        if e.code == NO_CAPACITY and capacity == "none":
            line = f"no capacity for {t} in {region} right now, nor for any type anywhere: retry in a few minutes"
        elif e.code == NO_CAPACITY and capacity is not None:
            line = (f"no capacity for {t} in {region} right now; capacity now: {capacity}: pass one of those as --type/--region, "
                    "or retry in a few minutes")
        elif e.code == NO_CAPACITY:
            line = (f"no capacity for {t} in {region} right now: `fab types` lists the regions that have it, or pass --region auto; "
                    "capacity comes and goes, retry in a few minutes")
        elif e.code == FS_WRONG_REGION:
            line = f"file system {fs} is not in {region}: launch in the file system's region (--region auto picks it) or use another --fs"
        elif e.code == FS_UNSUPPORTED:
            line = f"{region} does not support file systems for {t}: drop --fs or pick another region"
        elif e.code in (INVALID_PARAMETERS, NOT_FOUND) and "ssh" in msg:
            line = f"unknown SSH key name {key!r} for Lambda Cloud: add it at https://cloud.lambdalabs.com/ssh-keys (names are case-sensitive)"
        elif e.code in (INVALID_PARAMETERS, NOT_FOUND) and ("file system" in msg or "filesystem" in msg or "file_system" in msg):
            line = f"unknown file system {fs!r} (gone since the plan?): run again, which creates a missing one, or pass another --fs"
        elif e.code in (INVALID_PARAMETERS, NOT_FOUND) and ("instance type" in msg or "instance_type" in msg):
            line = f"unknown instance type {t!r}: `fab types` lists them"
        else:
            return e
        return LambdaAPIError(line, e.code, e.status, e.message)

    def terminate(self, instance_ids: list[str]) -> list[dict]:
        if not instance_ids:
            raise UserError("no instance to terminate")
        return self._call("POST", "/instance-operations/terminate", {"instance_ids": list(instance_ids)})["terminated_instances"]

    # --- transport -------------------------------------------------------------------------------------
    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after and retry_after.strip().isdigit():
            return min(float(retry_after), 60.0)
        return min(self.backoff * 2**attempt, self.max_backoff)

    def _call(self, method: str, path: str, body: dict | None = None, unsafe: bool = False):
        url = self.base_url + path
        last = ""
        for attempt in range(self.tries):
            final = attempt == self.tries - 1
            try:
                r = self.session.request(method, url, json=body, auth=self._auth, timeout=self.timeout)
            except (requests.ConnectionError, requests.Timeout) as e:
                last = type(e).__name__
                if unsafe and not _never_sent(e):  # the request may have reached the API
                    raise _Ambiguous(last) from None
                if final:
                    raise UserError(f"cannot reach the Lambda Cloud API at {self.base_url} ({last} after {self.tries} tries): "
                                    f"check your network, or {BASE_URL_ENV}") from None
                self._sleep(self._delay(attempt, None))
                continue
            if r.status_code == 429 or r.status_code >= 500:
                last = f"HTTP {r.status_code}"
                if r.status_code >= 500 and unsafe:
                    raise _Ambiguous(last)
                if final:
                    break
                self._sleep(self._delay(attempt, r.headers.get("Retry-After")))
                continue
            return self._data(r, method, path)
        if last == "HTTP 429":
            raise LambdaAPIError(f"the Lambda Cloud API is rate-limiting us (HTTP 429 {self.tries} times in a row): wait a minute and retry",
                                 status=429)
        raise LambdaAPIError(f"the Lambda Cloud API failed {self.tries} times ({last} on {method} {path}): "
                             "Lambda may be having an outage, try again in a few minutes", status=int(last.split()[-1]) if "HTTP" in last else 0)

    def _data(self, r: requests.Response, method: str, path: str):
        try:
            payload = r.json()
        except ValueError:
            payload = None
        if r.ok and isinstance(payload, dict) and "data" in payload:
            return payload["data"]
        err = payload.get("error") if isinstance(payload, dict) else None
        if not isinstance(err, dict):
            raise LambdaAPIError(f"unexpected reply from {self.base_url} to {method} {path} (HTTP {r.status_code}, not Lambda's JSON): "
                                 f"check {BASE_URL_ENV}", status=r.status_code)
        code = str(err.get("code") or "")
        message = self._scrub(str(err.get("message") or "").strip().rstrip("."))
        suggestion = self._scrub(str(err.get("suggestion") or "").strip().rstrip("."))
        fields = payload.get("field_errors") if isinstance(payload.get("field_errors"), dict) else {}
        details = "; ".join(f"{k}: {self._scrub(str((v or {}).get('message', v)))}" for k, v in fields.items())
        raise LambdaAPIError(self._explain(code, r.status_code, message, suggestion, details), code, r.status_code, message)

    def _explain(self, code: str, status: int, message: str, suggestion: str, details: str) -> str:
        if code == INVALID_KEY or status == 401:
            return (f"Lambda Cloud rejected the API key (invalid, expired or deleted): create one at {KEYS_PAGE} and put it in "
                    f"{KEY_ENV} or {DEFAULT_KEY_FILE} (chmod 600)")
        if code == ACCOUNT_INACTIVE:
            return "your Lambda Cloud account is inactive: check billing at https://cloud.lambdalabs.com"
        if code == QUOTA:
            return (f"Lambda Cloud quota reached ({message or 'instance limit'}): terminate an instance (fab instances, fab terminate) "
                    "or ask Lambda to raise the limit; new accounts' limits grow as invoices are paid")
        text = message or code or f"HTTP {status}"
        extra = "; ".join(x for x in (details, suggestion) if x)
        line = f"Lambda Cloud API: {text}" + (f" ({extra})" if extra else "") + (f" [{code}]" if code else "")
        return " ".join(line.split())

    def _scrub(self, text: str) -> str:
        key = self._auth._key
        return text.replace(key, "***") if key and key in text else text


class _Ambiguous(Exception):
    """A launch whose outcome is unknown (server error or connection lost after sending)."""


def _never_sent(e: Exception) -> bool:
    """True when the connection was never made (refused, DNS, connect timeout): retrying cannot duplicate anything."""
    from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError

    if isinstance(e, requests.ConnectTimeout):
        return True
    reason = getattr(e.args[0], "reason", None) if e.args else None
    return isinstance(reason, (NewConnectionError, ConnectTimeoutError, NameResolutionError))


def capacity_summary(types: dict, exclude: tuple[str, str] | None = None) -> str:
    """The instance-types reply as one phrase, "TYPE in REGION, REGION; TYPE in REGION", cheapest first; "none" when
    no type has capacity anywhere. `exclude` drops one (type, region) pair."""
    parts = []
    for name, entry in sorted(types.items(), key=lambda kv: (int(kv[1]["instance_type"]["price_cents_per_hour"]), kv[0])):
        regions = [r["name"] for r in entry.get("regions_with_capacity_available") or [] if (name, r["name"]) != exclude]
        if regions:
            parts.append(f"{name} in {', '.join(regions)}")
    return "; ".join(parts) or "none"


def _path_id(instance_id: str) -> str:
    # Ids are hex strings; refusing anything else keeps a typo (or a '/') from addressing another endpoint.
    if not instance_id or not all(c.isalnum() or c in "-_" for c in instance_id):
        raise UserError(f"{instance_id!r} is not an instance id: copy it from `fab instances`")
    return instance_id
