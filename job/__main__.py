"""`python -m job`: the same as the `vat-job` console script (see `job.cli`)."""

from job.cli import entrypoint

if __name__ == "__main__":
    entrypoint()
