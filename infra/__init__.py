"""The laptop-side launcher behind `fab` (fabfile.py): SSH to the box, preflight, the image, data, the trainer
container, logs, status, stop, fetch-weights, Lambda Cloud provisioning; the image's CUDA flavour for the
box's driver (flavour.py), the secrets it sends to the box (credentials.py) and `fab launch --dry-run`'s plan
(plan.py). None of it runs on the box or goes into the image. It installs from requirements-launcher.txt alone
(no torch, no numpy) and takes from job/ only what imports neither: job.contract (paths, markers, exit statuses,
preset step counts), job.errors, job.fsutil, job.metrics' formatting, and the clients in job/sidecar/ that the
box's sidecars use too.
"""
