"""The `lmbatch` console script: the same job as `python jobs/generate.py`, configs from the package."""

from __future__ import annotations

import sys
from typing import Callable

import hydra
from omegaconf import DictConfig

from lmbatch.config import ConfigError, register_configs
from lmbatch.errors import JobError

# Set once Hydra has composed the config and handed it to the job: an exit before that is Hydra's.
_config_composed = False


def run_cli(cfg: DictConfig) -> None:
    """Run the job; a bad job or config ends with one readable line and exit status 2, a job that
    fails while it runs with one line on the cause and exit status 1."""
    global _config_composed
    _config_composed = True
    from lmbatch.errors import JobFailed
    from lmbatch.pipeline.run import run

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


def run_hydra_main(hydra_main: Callable[[], None]) -> None:
    """Call a @hydra.main job. Hydra reports a config it cannot compose (an unknown key, a wrong
    type, a missing group option, a malformed override) with a readable message of its own and exit
    status 1, which is the status of a job that failed while it ran: make it 2, as for every other bad
    job, so that a scheduler's retry policy keyed on the status does not retry a typo."""
    register_configs()
    try:
        hydra_main()
    except SystemExit as e:
        if e.code == 1 and not _config_composed:
            raise SystemExit(2) from None
        raise


@hydra.main(config_path="pkg://lmbatch.conf", config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_cli(cfg)


def console_main() -> None:
    run_hydra_main(main)


if __name__ == "__main__":
    console_main()
