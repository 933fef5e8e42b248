"""The `lmbatch` console script: the same job as `python jobs/generate.py`, configs from the package."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from lmbatch.config import ConfigError
from lmbatch.io import JobError


def run_cli(cfg: DictConfig) -> None:
    """Run the job; a bad job or config ends with one readable line and exit status 2, a job that
    fails while it runs with one line on the cause and exit status 1."""
    from lmbatch.pipeline import JobFailed, run

    try:
        run(cfg)
    except (JobError, ConfigError) as e:
        print(f"lmbatch: error: {e}", file=sys.stderr)
        sys.exit(2)
    except JobFailed as e:
        print(f"lmbatch: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # the job has said what is committed; no traceback for a Ctrl-C
        sys.exit(130)


@hydra.main(config_path="pkg://lmbatch.conf", config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_cli(cfg)


if __name__ == "__main__":
    main()
