"""Lambda Cloud fab tasks: thin wrappers over infra.cloud (imported by fabfile.py). Key: LAMBDA_API_KEY or a 0600 file."""

from __future__ import annotations

from fabric import task

from job.errors import cli_main, number

KEY_HELP = {"api_key_file": "file holding the Lambda API key, mode 600 (default ~/.config/lambda/api_key; LAMBDA_API_KEY wins)",
            "api_base": "API base URL (default https://cloud.lambdalabs.com/api/v1, or LAMBDA_API_BASE)"}


def _api(api_key_file, api_base):
    from job.sidecar.lambda_cloud import LambdaCloud

    return LambdaCloud.from_env(api_key_file, api_base)


@task(help=KEY_HELP)
def types(c, api_key_file=None, api_base=None):
    """Instance types: GPUs, price per hour, and the regions that have capacity right now."""
    from infra.cloud import types_table

    cli_main(lambda: print(types_table(_api(api_key_file, api_base).instance_types())))()


@task(help=KEY_HELP)
def instances(c, api_key_file=None, api_base=None):
    """Your instances (running, booting, terminating) with IP and price."""
    from infra.cloud import dollars, instances_table

    @cli_main
    def run():
        found = _api(api_key_file, api_base).instances()
        if not found:
            print("no instances")
            return
        print(instances_table(found))
        running = sum((i.get("instance_type") or {}).get("price_cents_per_hour", 0) or 0 for i in found)
        print(f"{len(found)} instance(s), {dollars(running)}/hour in all")

    run()


@task(help=dict(KEY_HELP, type="instance type, e.g. gpu_8x_h100_sxm5 (fab types)", region="region, or auto: one with capacity now",
                ssh_key="name of your SSH key in Lambda Cloud",
                fs="persistent file system to attach (decides the region); created in the launch region if you have none by that name",
                name="instance name (default nanogpt-DATE-TIME-XXXX)", yes="do not ask before launching (it costs money)",
                ssh_port="port to wait on for SSH (22)", timeout="seconds to wait for active (default 1800)",
                poll="seconds between status checks (default 5)", dry_run="check and show the plan; create and launch nothing"))
def provision(c, type="", region="auto", ssh_key="", fs=None, name=None, yes=False, ssh_port="22", timeout="1800", api_key_file=None,
              api_base=None, poll="5", dry_run=False):
    """Launch an instance, wait until it is active and answers SSH, print its IP and the next command."""
    from infra.cloud import confirm, dollars, plan_provision
    from infra.cloud import provision as launch

    @cli_main
    def run():
        port = number(ssh_port, "--ssh-port", minimum=1, maximum=65535)
        wait_s, poll_s = number(timeout, "--timeout", float), number(poll, "--poll", float, minimum=0.001)
        api = _api(api_key_file, api_base)
        plan = plan_provision(api, type, region, ssh_key, fs)
        if dry_run:
            print(f"plan (dry run: nothing created or launched): {plan.type_name} in {plan.region} at {dollars(plan.price_cents)}/hour")
            if plan.create_fs:
                print(plan.fs_line(dry=True))
            return
        if plan.create_fs:
            print(plan.fs_line())
        confirm(f"Launch {plan.type_name} in {plan.region} at {dollars(plan.price_cents)}/hour, billed until terminated?", yes)
        inst = launch(api, plan=plan, name=name, ssh_port=port, timeout=wait_s, poll_interval=poll_s)
        print(f"ready: {inst['name']} (id {inst['id']}) at {inst['ip']}, {dollars(plan.price_cents)}/hour")
        print(f"next:  fab launch --host ubuntu@{inst['ip']} --accept-new-host-key")
        print(f"done:  fab terminate --id {inst['id']}")

    run()


@task(help=dict(KEY_HELP, id="instance id (fab instances)", name="instance name", yes="do not ask for confirmation"))
def terminate(c, id=None, name=None, yes=False, api_key_file=None, api_base=None):
    """Terminate an instance by --id or --name (asks for a typed yes unless --yes)."""
    from infra.cloud import find_instance
    from infra.cloud import terminate as stop

    @cli_main
    def run():
        api = _api(api_key_file, api_base)
        stop(api, [find_instance(api, id, name)], yes=yes)

    run()
