"""What runs on the box beside the trainer, in containers of the trainer image: the cost guard (guard.py) and the
S3 sidecar (sync.py), and the clients they share with the laptop's launcher: S3 uploads verified by sha256 (s3.py,
digest.py) and the Lambda Cloud API (lambda_cloud.py).

The shared clients live here, in the package the image installs, rather than in infra/ (the laptop only): the
sidecars need them in the image, and the laptop uses the very same code so that both sides agree on what they
write and check (the sha256 metadata of an S3 object, the .fetched/.synced markers, the API's error lines).
Nothing in this package imports torch or numpy: the launcher imports it in a virtualenv that has neither
(requirements-launcher.txt; tests/test_launcher_venv.py checks it).
"""
