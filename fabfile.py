"""Laptop-side tasks (`fab --list`). Each task is a thin wrapper over a plain function in infra/ that takes
a Connection; those functions are what the tests call directly."""

from __future__ import annotations

from fabric import task

from job.errors import UserError, cli_main


def _connect(host: str, port: int | None, key: str | None, known_hosts: str | None, accept_new_host_key: bool):
    from infra.ssh import connect

    if not host:
        raise UserError("no box given: pass --host ubuntu@IP")
    return connect(host, port=port, key=key, known_hosts=known_hosts, accept_new_host_key=accept_new_host_key)


@task(help={
    "host": "the box, e.g. ubuntu@203.0.113.7",
    "to": "local directory (default ./model_weights)",
    "weights_dir": "the box's weights dir (default ~/model_weights)",
    "latest_only": "only the newest checkpoint (plus logs)",
    "key": "SSH private key (default: agent / ~/.ssh)",
    "port": "SSH port (default 22)",
    "known_hosts": "known_hosts file (default ~/.ssh/known_hosts)",
    "accept_new_host_key": "trust a box seen for the first time and remember its key",
    "s3": "also upload them to s3://BUCKET/PREFIX (AWS credentials from the usual chain)",
    "s3_endpoint": "S3-compatible endpoint URL (default: AWS, or AWS_ENDPOINT_URL)",
})
def fetch_weights(c, host="", to="model_weights", weights_dir="model_weights", latest_only=False, key=None, port=None,
                  known_hosts=None, accept_new_host_key=False, s3=None, s3_endpoint=None):
    """Copy checkpoints and logs from the box (incremental, resumable, sha256-verified), optionally on to S3."""
    from pathlib import Path

    from infra.fetch import fetch_weights as fetch
    from infra.s3 import client, parse_s3_url, upload_files

    @cli_main
    def run():
        if s3:
            parse_s3_url(s3)  # a typo fails before any transfer
        conn = _connect(host, int(port) if port else None, key, known_hosts, accept_new_host_key)
        with conn:
            report = fetch(conn, weights_dir, to, latest_only=latest_only)
        print(f"fetched {len(report.copied)} files ({report.bytes_transferred / 2**20:.1f} MiB) to {to}, "
              f"{len(report.skipped)} already complete")
        if s3:
            up = upload_files([Path(to) / n for n in report.copied + report.skipped], s3, s3=client(s3_endpoint))
            print(f"uploaded {len(up.uploaded)} files to {s3}, {len(up.skipped)} already there")

    run()
