"""Generate text for every row of a Parquet input.

    python jobs/generate.py                                   # built-in sample prompts and tiny model
    python jobs/generate.py input.path=prompts.parquet output.path=out model.path=/models/qwen
    python jobs/generate.py --help                            # every config group and key
"""

import pathlib
import sys

# Let the job run from a plain checkout too (e.g. `ray job submit --working-dir .`).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from lmbatch.cli import run_cli, run_hydra_main  # noqa: E402


@hydra.main(config_path="../conf", config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_cli(cfg)


if __name__ == "__main__":
    run_hydra_main(main)
