"""`python -m job.prepare`: see job/prepare/__init__.py."""

from job.prepare.cli import main

if __name__ == "__main__":
    main()
