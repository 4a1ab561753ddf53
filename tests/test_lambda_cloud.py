"""Lambda Cloud client, workflows and fab tasks against a fake API served over real HTTP (tests/fake_lambda.py), with
SSH readiness checked on a real socket or a real sshd. No mocks of requests: every call crosses a socket."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading

import pytest

from infra import cloud
from job.errors import UserError
from job.sidecar.lambda_cloud import LambdaAPIError, LambdaCloud, load_api_key
from tests.conftest import ROOT
from tests.fake_lambda import A10, A100, H100, TEST_KEY, FakeLambda
from tests.sshd import free_port, sshd_available, start_sshd


@pytest.fixture
def fake():
    with FakeLambda(boot_polls=2) as f:
        yield f
        assert f.problems == [], f.problems  # every request had the documented shape
        assert all(r.auth_scheme == "Bearer" and r.auth_ok for r in f.requests if r.auth_scheme), f.requests


@pytest.fixture
def api(fake):
    return LambdaCloud(TEST_KEY, fake.url, backoff=0.01, tries=4)


@pytest.fixture
def banner():
    """A listening socket that greets like sshd: enough for the 'SSH answers' wait, without starting one."""
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"SSH-2.0-OpenSSH_9.6 test\r\n")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join()
    srv.close()


def one_line(e: BaseException) -> str:
    msg = str(e)
    assert "\n" not in msg and TEST_KEY not in msg, msg
    return msg


# --- API key ------------------------------------------------------------------------------------------
def test_key_from_env_then_0600_file(tmp_path):
    assert load_api_key(None, {"LAMBDA_API_KEY": " k1 \n"}) == "k1"
    f = tmp_path / "api_key"
    f.write_text("k2\n")
    f.chmod(0o600)
    assert load_api_key(str(f), {}) == "k2"
    f.chmod(0o644)
    with pytest.raises(UserError) as e:
        load_api_key(str(f), {})
    assert f"chmod 600 {f}" in one_line(e.value) and "k2" not in str(e.value)
    with pytest.raises(UserError) as e:
        load_api_key(str(tmp_path / "missing"), {})
    assert "LAMBDA_API_KEY" in one_line(e.value) and "chmod 600" in str(e.value)


def test_key_hidden_from_repr(api):
    assert TEST_KEY not in repr(api) and TEST_KEY not in repr(api._auth) and TEST_KEY not in repr(vars(api))


# --- client -------------------------------------------------------------------------------------------
def test_types_table(api, fake):
    table = cloud.types_table(api.instance_types())
    lines = table.splitlines()
    assert lines[0].split() == ["TYPE", "GPUS", "PRICE/HOUR", "REGIONS", "WITH", "CAPACITY", "NOW"]
    # Types with capacity first, cheapest first; none-available last.
    assert [ln.split()[0] for ln in lines[1:]] == [A10, H100, A100]
    assert lines[2].split() == [H100, "8", "$23.92", "us-west-1,", "us-east-1"]
    assert lines[3].endswith("- (none now)")
    assert [(r.method, r.path) for r in fake.requests] == [("GET", "/instance-types")]


def test_invalid_key_is_one_clear_line(fake):
    bad = LambdaCloud("not-the-key-77", fake.url, backoff=0)
    with pytest.raises(LambdaAPIError) as e:
        bad.instances()
    msg = one_line(e.value)
    assert "rejected the API key" in msg and "not-the-key-77" not in msg and e.value.code == "global/invalid-api-key"
    assert fake.requests[-1].auth_scheme == "Bearer" and not fake.requests[-1].auth_ok
    fake.requests.clear()  # the fixture's auth check is for the good key


def test_429_then_success_and_5xx_retried(api, fake):
    fake.fail_next("GET", "/instance-types", 429, retry_after="0")
    fake.fail_next("GET", "/instances", 503, times=2)
    assert H100 in api.instance_types()
    assert api.instances() == []
    assert len(fake.calls("GET", "/instance-types")) == 2 and len(fake.calls("GET", "/instances")) == 3


def test_rate_limit_that_persists(api, fake):
    fake.fail_next("GET", "/ssh-keys", 429, times=10)
    with pytest.raises(LambdaAPIError) as e:
        api.ssh_keys()
    assert "rate-limiting" in one_line(e.value) and len(fake.calls("GET", "/ssh-keys")) == 4


def test_unreachable_api():
    with pytest.raises(UserError) as e:
        LambdaCloud(TEST_KEY, f"http://127.0.0.1:{free_port()}/api/v1", backoff=0, tries=2).instances()
    assert "cannot reach the Lambda Cloud API" in one_line(e.value) and "LAMBDA_API_BASE" in str(e.value)


def test_launch_reply_lost_does_not_launch_twice(api, fake):
    # The launch happened but its reply was a 500: the client finds the instance by name instead of launching again.
    fake.fail_next("POST", "/instance-operations/launch", 500, served=True)
    ids = api.launch("us-west-1", H100, "laptop", "run-1")
    assert len(fake.instances) == 1 and ids == list(fake.instances)
    assert len(fake.calls("POST", "/instance-operations/launch")) == 1
    # A 500 with nothing launched: retried, one instance in the end.
    fake.fail_next("POST", "/instance-operations/launch", 500)
    api.launch("us-west-1", H100, "laptop", "run-2")
    assert sorted(i["name"] for i in fake.instances.values()) == ["run-1", "run-2"]


def test_launch_body_and_server_side_errors(api, fake):
    api.launch("us-east-1", H100, "laptop", "n1", "fineweb")
    body = fake.calls("POST", "/instance-operations/launch")[0].body
    assert body == {"region_name": "us-east-1", "instance_type_name": H100, "ssh_key_names": ["laptop"],
                    "file_system_names": ["fineweb"], "quantity": 1, "name": "n1"}
    cases = [(("us-east-1", A100, "laptop", "n2"), "no capacity for gpu_8x_a100_80gb_sxm4 in us-east-1 right now"),
             (("us-east-1", H100, "nope", "n3"), "unknown SSH key name 'nope'"),
             (("us-west-1", H100, "laptop", "n4", "fineweb"), "file system fineweb is not in us-west-1")]
    for args, words in cases:
        with pytest.raises(LambdaAPIError) as e:
            api.launch(*args)
        assert words in one_line(e.value)
    fake.quota = 1
    with pytest.raises(LambdaAPIError) as e:
        api.launch("us-west-1", H100, "laptop", "n5")
    assert "quota reached" in one_line(e.value) and e.value.code == "global/quota-exceeded"


# --- workflows ----------------------------------------------------------------------------------------
def test_pick_region(api):
    types = api.instance_types()
    assert cloud.pick_region(types, H100) == "us-west-1"
    assert cloud.pick_region(types, H100, "us-east-1") == "us-east-1"
    assert cloud.pick_region(types, H100, "auto", required_region="us-east-1") == "us-east-1"
    for args, words in [((A100,), "no capacity for gpu_8x_a100_80gb_sxm4 in any region"),
                        ((H100, "us-south-1"), "capacity now in: us-west-1, us-east-1"),
                        ((A10, "auto", "us-east-1"), "in us-east-1 (the file system's region)"),
                        (("gpu_9x_nope",), "unknown instance type 'gpu_9x_nope'"),
                        ((H100, "us-west-1", "us-east-1"), "the file system lives in us-east-1")]:
        with pytest.raises(UserError) as e:
            cloud.pick_region(types, *args)
        assert words in one_line(e.value)
    for entry in types.values():
        entry["regions_with_capacity_available"] = []
    with pytest.raises(UserError) as e:
        cloud.pick_region(types, H100)
    assert one_line(e.value) == "no capacity for gpu_8x_h100_sxm5 in any region right now, nor for any other type: retry in a few minutes"


def test_provision_booting_active_ssh(api, fake, banner, capsys):
    inst = cloud.provision(api, H100, "auto", "laptop", "fineweb", name="gpt2-run", poll_interval=0.01, ssh_port=banner)
    assert inst["status"] == "active" and inst["ip"] == "127.0.0.1" and inst["name"] == "gpt2-run"
    out = capsys.readouterr().out
    assert "launched gpu_8x_h100_sxm5 in us-east-1 as gpt2-run" in out and "$23.92/hour" in out
    assert "gpt2-run: booting after" in out and "gpt2-run: active after" in out and "waiting for SSH" in out
    assert fake.polls[inst["id"]] == 3  # booting, booting, active
    assert fake.calls("POST", "/instance-operations/launch")[0].body["file_system_names"] == ["fineweb"]


def test_provision_checks_before_launching(api, fake):
    for kw, words in [({"ssh_key": "nope"}, "unknown SSH key name 'nope': Lambda Cloud has 'laptop'"),
                      ({"ssh_key": "laptop", "fs": "9lives"}, "Lambda Cloud refused the file system name '9lives' (Invalid filesystem name)"),
                      ({"ssh_key": "laptop", "type_name": A100}, "no capacity for gpu_8x_a100_80gb_sxm4 in any region")]:
        with pytest.raises(UserError) as e:
            cloud.provision(api, **{"type_name": H100, **kw})
        assert words in one_line(e.value)
    assert fake.calls("POST", "/instance-operations/launch") == []


def test_capacity_gone_between_plan_and_launch(api, fake):
    plan = cloud.plan_provision(api, H100, "auto", "laptop")
    fake.types[H100]["regions_with_capacity_available"] = []
    with pytest.raises(LambdaAPIError) as e:
        cloud.provision(api, plan=plan, poll_interval=0.01)
    assert one_line(e.value) == ("no capacity for gpu_8x_h100_sxm5 in us-west-1 right now; capacity now: gpu_1x_a10 in us-south-1: "
                                 "pass one of those as --type/--region, or retry in a few minutes")
    assert fake.instances == {}


def test_no_capacity_names_where_there_is(api, fake):
    # The list still offers the refused pair (it lags behind launches): the line leaves it out and names the rest.
    fake.fail_next("POST", "/instance-operations/launch", 400, "instance-operations/launch/insufficient-capacity", "Not enough capacity")
    with pytest.raises(LambdaAPIError) as e:
        api.launch("us-west-1", H100, "laptop", "n1")
    assert "capacity now: gpu_1x_a10 in us-south-1; gpu_8x_h100_sxm5 in us-east-1:" in one_line(e.value)
    for entry in fake.types.values():
        entry["regions_with_capacity_available"] = []
    with pytest.raises(LambdaAPIError) as e:
        api.launch("us-west-1", H100, "laptop", "n2")
    assert one_line(e.value) == "no capacity for gpu_8x_h100_sxm5 in us-west-1 right now, nor for any type anywhere: retry in a few minutes"
    fake.fail_next("GET", "/instance-types", 500, times=4)  # the list cannot be had: the line still says what failed
    with pytest.raises(LambdaAPIError) as e:
        api.launch("us-west-1", H100, "laptop", "n3")
    assert "no capacity for gpu_8x_h100_sxm5 in us-west-1 right now: `fab types` lists" in one_line(e.value)
    assert fake.instances == {}


def test_create_file_system_and_the_api_refusals(api, fake):
    fs = api.create_file_system("data-1", "us-west-1")
    assert fs["name"] == "data-1" and fs["region"]["name"] == "us-west-1" and fs["mount_point"] == "/lambda/nfs/data-1"
    assert fake.calls("POST", "/filesystems")[0].body == {"name": "data-1", "region": "us-west-1"}
    assert "data-1" in {f["name"] for f in api.file_systems()}
    for args, words in [(("-bad", "us-west-1"), "Lambda Cloud refused the file system name '-bad' (Invalid filesystem name)"),
                        (("x" * 61, "us-west-1"), "use 1-60 letters, digits and hyphens, starting with a letter"),
                        (("data-2", "mars-1"), "Lambda Cloud cannot create file system 'data-2' in mars-1 (Invalid region)")]:
        with pytest.raises(LambdaAPIError) as e:
            api.create_file_system(*args)
        assert words in one_line(e.value)
    with pytest.raises(LambdaAPIError) as e:
        api.create_file_system("data-1", "us-east-1")
    assert e.value.code == "global/duplicate" and "already exists" in one_line(e.value)
    assert [f["name"] for f in fake.file_systems] == ["fineweb", "data-1"]


def test_provision_creates_a_missing_file_system_once(api, fake, capsys):
    plan = cloud.plan_provision(api, H100, "auto", "laptop", "fresh")
    assert plan.create_fs and plan.region == "us-west-1"  # no file system to follow: the first region with capacity
    assert fake.calls("POST", "/filesystems") == []  # planning creates nothing
    cloud.provision(api, plan=plan, name="n1", wait=False)
    assert "created file system fresh in us-west-1" in capsys.readouterr().out
    assert fake.calls("POST", "/instance-operations/launch")[0].body["file_system_names"] == ["fresh"]
    # A second provision finds it and follows it to its region; none is created.
    again = cloud.plan_provision(api, H100, "auto", "laptop", "fresh")
    assert not again.create_fs and again.region == "us-west-1"
    # A plan made before another provision created it: the API's duplicate answer is settled by the list.
    cloud.provision(api, plan=plan, name="n2", wait=False)
    assert "file system fresh already exists in us-west-1; using it" in capsys.readouterr().out
    assert [f["name"] for f in fake.file_systems] == ["fineweb", "fresh"]
    late = cloud.Plan(H100, "us-east-1", "laptop", "fresh", 2392, 8, create_fs=True)
    with pytest.raises(UserError) as e:
        cloud.provision(api, plan=late, name="n3", wait=False)
    assert one_line(e.value) == "file system fresh appeared in us-west-1 meanwhile, not us-east-1: run again with --region us-west-1 or auto"
    assert len(fake.calls("POST", "/instance-operations/launch")) == 2


def test_file_system_create_whose_reply_was_lost(api, fake, capsys):
    fake.fail_next("POST", "/filesystems", 502, served=True)  # created, then the reply is lost: the retry meets the name taken
    plan = cloud.plan_provision(api, A10, "auto", "laptop", "lost-reply")
    cloud.provision(api, plan=plan, name="n1", wait=False)
    assert len(fake.calls("POST", "/filesystems")) == 2
    assert [f["name"] for f in fake.file_systems] == ["fineweb", "lost-reply"]
    assert "file system lost-reply already exists in us-south-1; using it" in capsys.readouterr().out
    assert fake.calls("POST", "/instance-operations/launch")[0].body["file_system_names"] == ["lost-reply"]


def test_quota_reached(api, fake):
    fake.quota = 0
    with pytest.raises(LambdaAPIError) as e:
        cloud.provision(api, H100, "auto", "laptop", poll_interval=0.01)
    assert "quota reached" in one_line(e.value) and "fab terminate" in str(e.value)


def test_unhealthy_instance_is_terminated(api, fake, capsys):
    fake.next_status = "unhealthy"
    with pytest.raises(UserError) as e:
        cloud.provision(api, H100, "auto", "laptop", name="sick", poll_interval=0.01)
    assert "became unhealthy; terminated it so it is not billed" in one_line(e.value)
    (iid,) = fake.instances
    assert fake.instances[iid]["status"] == "terminated"
    assert fake.calls("POST", "/instance-operations/terminate")[0].body == {"instance_ids": [iid]}


def test_ssh_that_never_answers(api, fake):
    with pytest.raises(UserError) as e:
        cloud.provision(api, H100, "auto", "laptop", poll_interval=0.01, ssh_port=free_port(), ssh_timeout=0.2)
    assert "did not answer within" in one_line(e.value) and "billed" in str(e.value)


def test_find_and_terminate(api, fake):
    a = fake.add_instance("box-a")
    fake.add_instance("twin")
    fake.add_instance("twin")
    assert cloud.find_instance(api, name="box-a")["id"] == a["id"]
    assert cloud.find_instance(api, instance_id=a["id"])["name"] == "box-a"
    for kw, words in [({"name": "twin"}, "2 instances are named 'twin'"), ({"name": "ghost"}, "no running instance named 'ghost'"),
                      ({"instance_id": "0" * 32}, "no instance with id"), ({}, "exactly one of --id ID or --name NAME"),
                      ({"instance_id": "../ssh-keys"}, "is not an instance id")]:
        with pytest.raises(UserError) as e:
            cloud.find_instance(api, **kw)
        assert words in one_line(e.value)
    with pytest.raises(cloud.Aborted):
        cloud.terminate(api, [a], input_fn=lambda prompt: "no")
    assert a["status"] == "active" and fake.calls("POST", "/instance-operations/terminate") == []
    done = cloud.terminate(api, [a], input_fn=lambda prompt: "yes")
    assert [i["id"] for i in done] == [a["id"]] and a["status"] == "terminated"


def test_cost_estimates(tmp_path):
    hours, dollars = cloud.estimate_cost(2392, 19073, 0.25)
    assert hours == pytest.approx(19073 * 0.25 / 3600 * 1.1 + 0.25) and dollars == pytest.approx(hours * 23.92)
    assert cloud.estimate_cost(2392, 1000, 0.5, nodes=2)[1] == pytest.approx(2 * cloud.estimate_cost(2392, 1000, 0.5)[1])
    assert cloud.assumed_step_seconds(H100) == pytest.approx(2**19 / (dict(cloud.ASSUMED_TOKENS_PER_GPU_SECOND)["h100"] * 8))
    assert cloud.assumed_step_seconds("gpu_1x_mystery") is None
    plan = cloud.Plan(H100, "us-east-1", "laptop", None, 2392, 8)
    line = cloud.cost_line(plan, 19073)
    assert line.startswith(f"gpu_8x_h100_sxm5 x1 in us-east-1: $23.92/hour; 19073 steps x {cloud.assumed_step_seconds(H100):.2f} s (assumed)")
    assert "about $" in line
    assert "(measured)" in cloud.cost_line(plan, 100, 0.3)
    assert "no estimate" in cloud.cost_line(cloud.Plan("gpu_1x_mystery", "r", "k", None, 100, 1), 100)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"event": "train", "step": i, "ms": 900.0 if i < 10 else 330.0}) + "\n" for i in range(30)))
    assert cloud.measured_step_seconds(metrics) == pytest.approx(0.33)
    with pytest.raises(UserError, match="no step time .*: pass --step-seconds"):
        cloud.estimate_cost(2392, 100, None)
    for bad in (0, -0.5, float("nan")):  # a step time that was given but is no step time: the line says what is wrong with it
        with pytest.raises(UserError, match=r"must be positive, got .* seconds: pass --step-seconds with the seconds a step takes"):
            cloud.estimate_cost(2392, 100, bad)


# --- fab tasks, as real subprocesses --------------------------------------------------------------------
def fab(fake, *args, stdin: str = "", key: str | None = TEST_KEY, home=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAMBDA_")}
    env.update(PYTHONPATH=str(ROOT), LAMBDA_API_BASE=fake.url)
    if home:
        env["HOME"] = str(home)  # no real ~/.config/lambda/api_key can leak in
    if key:
        env["LAMBDA_API_KEY"] = key
    proc = subprocess.run([sys.executable, "-m", "fabric", *map(str, args)], cwd=ROOT, env=env, input=stdin, capture_output=True,
                          text=True, timeout=120)
    assert TEST_KEY not in proc.stdout + proc.stderr  # the key never appears in any output
    return proc


def test_fab_types_and_instances(fake):
    r = fab(fake, "types")
    assert r.returncode == 0, r.stderr
    assert H100 in r.stdout and "us-west-1, us-east-1" in r.stdout
    r = fab(fake, "instances")
    assert r.returncode == 0 and r.stdout.strip() == "no instances"
    fake.add_instance("box-a")
    r = fab(fake, "instances")
    assert "box-a" in r.stdout and "127.0.0.1" in r.stdout and "1 instance(s), $23.92/hour in all" in r.stdout


def test_fab_key_file_must_be_private(fake, tmp_path):
    f = tmp_path / "key"
    f.write_text(TEST_KEY + "\n")
    f.chmod(0o640)
    r = fab(fake, "types", "--api-key-file", f, key=None, home=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == f"error: {f} is readable by other users (mode 640): run `chmod 600 {f}` and retry"
    assert fake.requests == []
    f.chmod(0o600)
    assert fab(fake, "types", "--api-key-file", f, key=None, home=tmp_path).returncode == 0
    r = fab(fake, "types", key=None, home=tmp_path)  # neither env nor the default file
    assert r.returncode == 2 and "no Lambda Cloud API key: set LAMBDA_API_KEY" in r.stderr


def test_fab_provision_end_to_end_with_real_sshd(fake, tmp_path, banner):
    """Fake API + a real sshd as the booted box: provision waits for `active`, then for sshd's greeting."""
    srv = start_sshd(tmp_path / "sshd") if sshd_available() else None
    port = srv.port if srv else banner
    try:
        fake.fail_next("GET", "/instance-types", 429, retry_after="0")  # rate-limited once on the way
        r = fab(fake, "provision", "--type", H100, "--ssh-key", "laptop", "--fs", "fineweb", "--name", "gpt2-e2e", "--yes",
                "--ssh-port", port, "--poll", "0.01")
    finally:
        if srv:
            srv.stop()
    assert r.returncode == 0, r.stderr
    (iid,) = fake.instances
    assert "launched gpu_8x_h100_sxm5 in us-east-1 as gpt2-e2e" in r.stdout
    assert f"ready: gpt2-e2e (id {iid}) at 127.0.0.1, $23.92/hour" in r.stdout
    assert "next:  fab launch --host ubuntu@127.0.0.1" in r.stdout and f"done:  fab terminate --id {iid}" in r.stdout


def test_fab_provision_asks_first(fake):
    r = fab(fake, "provision", "--type", H100, "--ssh-key", "laptop", stdin="no\n")
    assert r.returncode == 1 and "$23.92/hour" in r.stdout and r.stderr.strip() == "error: aborted: nothing was changed"
    assert fake.calls("POST", "/instance-operations/launch") == []
    r = fab(fake, "provision", "--type", A100, "--ssh-key", "laptop", "--yes")
    assert r.returncode == 2 and r.stderr.startswith("error: no capacity for gpu_8x_a100_80gb_sxm4") and len(r.stderr.splitlines()) == 1


def test_fab_provision_creates_the_file_system_it_lacks(fake, banner):
    base = ("provision", "--type", H100, "--ssh-key", "laptop", "--fs", "my-data")
    go = ("--yes", "--ssh-port", banner, "--poll", "0.01")
    r = fab(fake, *base, "--region", "us-east-1", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "would create file system my-data in us-east-1" in r.stdout
    r = fab(fake, "launch", "--provision", *base[1:], "--region", "us-east-1", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "would create file system my-data in us-east-1" in r.stdout and "plan (dry run: no instance launched)" in r.stdout
    assert fake.calls("POST", "/filesystems") == [] and fake.calls("POST", "/instance-operations/launch") == []
    r = fab(fake, *base, "--region", "us-east-1", *go, "--name", "box-1")
    assert r.returncode == 0, r.stderr
    assert "created file system my-data in us-east-1" in r.stdout.splitlines()
    assert [(f["name"], f["region"]["name"]) for f in fake.file_systems] == [("fineweb", "us-east-1"), ("my-data", "us-east-1")]
    assert fake.calls("POST", "/instance-operations/launch")[0].body["file_system_names"] == ["my-data"]
    # Present now: a second provision attaches it and creates nothing, and --region auto follows it.
    r = fab(fake, *base, *go, "--name", "box-2")
    assert r.returncode == 0, r.stderr
    assert "file system" not in r.stdout and "launched gpu_8x_h100_sxm5 in us-east-1 as box-2" in r.stdout
    assert len(fake.calls("POST", "/filesystems")) == 1 and len(fake.file_systems) == 2
    # In another region than the one asked for: the one line it always was.
    r = fab(fake, *base, "--region", "us-west-1", *go)
    assert r.returncode == 2 and r.stderr == "error: --region us-west-1 but the file system lives in us-east-1: use --region us-east-1 or auto\n"


def test_fab_provision_file_system_name_refused(fake):
    r = fab(fake, "provision", "--type", H100, "--ssh-key", "laptop", "--fs", "data_2026", "--yes")
    assert r.returncode == 2 and r.stderr == ("error: Lambda Cloud refused the file system name 'data_2026' (Invalid filesystem name): "
                                              "use 1-60 letters, digits and hyphens, starting with a letter\n")
    assert fake.calls("POST", "/instance-operations/launch") == [] and len(fake.file_systems) == 1
    assert fake.instances == {}


def test_fab_provision_no_capacity_names_where_there_is(fake):
    fake.fail_next("POST", "/instance-operations/launch", 400, "instance-operations/launch/insufficient-capacity",
                   "Not enough capacity to fulfill launch request.")
    r = fab(fake, "provision", "--type", H100, "--ssh-key", "laptop", "--region", "us-east-1", "--yes")
    assert r.returncode == 2, r.stderr
    assert r.stderr == ("error: no capacity for gpu_8x_h100_sxm5 in us-east-1 right now; capacity now: gpu_1x_a10 in us-south-1; "
                        "gpu_8x_h100_sxm5 in us-west-1: pass one of those as --type/--region, or retry in a few minutes\n")
    assert fake.instances == {}  # nothing left running
    r = fab(fake, "provision", "--type", A100, "--ssh-key", "laptop", "--yes")  # refused at planning: the same names
    assert r.returncode == 2 and r.stderr == ("error: no capacity for gpu_8x_a100_80gb_sxm4 in any region right now; capacity now: "
                                              "gpu_1x_a10 in us-south-1; gpu_8x_h100_sxm5 in us-west-1, us-east-1: pick one of those "
                                              "with --type, or retry in a few minutes\n")
    assert fake.calls("POST", "/instance-operations/launch")[1:] == []


def test_fab_terminate_confirms(fake):
    box = fake.add_instance("box-a")
    r = fab(fake, "terminate", "--name", "box-a", stdin="no\n")
    assert r.returncode == 1 and "aborted" in r.stderr and box["status"] == "active"
    assert fake.calls("POST", "/instance-operations/terminate") == []
    r = fab(fake, "terminate", "--name", "box-a", stdin="")  # no terminal, no answer: abort
    assert r.returncode == 1 and box["status"] == "active"
    r = fab(fake, "terminate", "--id", box["id"], stdin="yes\n")
    assert r.returncode == 0, r.stderr
    assert f"terminated {box['id']} (box-a)" in r.stdout and box["status"] == "terminated"
    other = fake.add_instance("box-b")
    r = fab(fake, "terminate", "--name", "box-b", "--yes")
    assert r.returncode == 0 and other["status"] == "terminated"
    r = fab(fake, "terminate", "--name", "box-b", "--yes")
    assert r.returncode == 2 and r.stderr.strip() == "error: no running instance named 'box-b': `fab instances` lists yours"


def test_fab_launch_provision_prices_the_recipe_before_asking(fake):
    r = fab(fake, "launch", "--provision", "--type", H100, "--ssh-key", "laptop", "--recipe", "speedrun-2025-05-24", stdin="no\n")
    assert r.returncode == 1 and r.stderr.strip() == "error: aborted: nothing was changed"
    line = next(x for x in r.stdout.splitlines() if "$23.92/hour;" in x)
    hours, cost = cloud.estimate_cost(2392, 1770, 181 / 1770)
    assert "1770 steps x 0.10 s (modded-nanogpt's published record (181 s for 1770 steps on 8xH100)" in line
    assert f"about {hours:.1f} h = about ${cost:,.2f}" in line
    assert fake.calls("POST", "/instance-operations/launch") == []
    r = fab(fake, "launch", "--provision", "--type", H100, "--ssh-key", "laptop", stdin="no\n")  # the gpt2 recipe: its full run
    assert f"19073 steps x {cloud.assumed_step_seconds(H100):.2f} s (assumed)" in r.stdout


def test_dry_run_prices_setup_from_the_last_launchs_timeline_and_training_from_the_step_time(fake, tmp_path):
    """--dry-run --provision: setup from the timeline a launch left beside the fetched weights (each stage it never
    measured says so), training from the recipe's published step time, each priced apart."""
    from infra.timeline import Timeline
    from job.recipes.speedrun_2025_05_24 import RECIPE

    home = tmp_path / "home"
    home.mkdir()
    args = ("launch", "--provision", "--type", H100, "--ssh-key", "laptop", "--region", "us-east-1", "--recipe", "speedrun-2025-05-24",
            "--fetch-to", home, "--dry-run")
    # Training from first principles: 1770 steps (the preset's) x the published step time, 10% more for evals and
    # checkpoints, at the type's $23.92 an hour.
    steps, step = 1770, RECIPE.published.step_seconds
    training = f"training: {steps} steps x {step:.2f} s ("
    dollars = steps * step * 1.10 / 3600 * 23.92

    r = fab(fake, *args)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    at = out.index("  setup: not measured yet (the first launch measures it)")
    assert out[at + 1:at + 6] == [f"    {s}: not measured yet" for s in ("boot", "preflight", "image", "data", "fetch")]
    assert out[at + 6].startswith("  " + training) and out[at + 6].endswith(f"= {steps * step * 1.10:.0f} s = ${dollars:,.2f}")
    assert any("0.25 h setup (assumed)" in line for line in out), r.stdout

    tl = Timeline("speedrun-2025-05-24", "gpt2", H100)
    for name, seconds in [("boot", 180.0), ("preflight", 20.0), ("image", 400.0), ("data", 480.0), ("training", 500.0)]:
        tl.add(name, seconds)
    (home / "timeline.json").write_text(tl.to_json())
    r = fab(fake, *args)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    # 1080 s of setup = 0.3 h at $23.92 = $7.176
    at = out.index("  setup: 1080 s measured = $7.18 (stages not measured yet are not in it)")
    assert out[at + 1:at + 6] == ["    boot: 180 s (measured)", "    preflight: 20 s (measured)", "    image: 400 s (measured)",
                                  "    data: 480 s (measured)", "    fetch: not measured yet"]
    assert out[at + 6].startswith("  " + training)
    assert any("0.3 h setup (measured)" in line for line in out), r.stdout

    (home / "timeline.json").write_text(Timeline("gpt2", "gpt2", H100, tl.stages).to_json())  # another recipe's: not this run's setup
    r = fab(fake, *args)
    assert "  setup: not measured yet (the first launch measures it)" in r.stdout.splitlines()
