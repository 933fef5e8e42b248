"""Throughput of lmbatch against the alternatives, side by side on one machine, as ratios.

    python jobs/benchmark.py                            # tiny model, a quick look (and what CI runs)
    python jobs/benchmark.py preset=cpu                 # the compute-heavy CPU comparison in the README
    python jobs/benchmark.py preset=gpu                 # one GPU: Qwen2.5-0.5B-shaped, bf16, 20k prompts
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from lmbatch.bench.benchmark import register_config, run_benchmark  # noqa: E402

register_config()


@hydra.main(config_path="../conf", config_name="benchmark", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_benchmark(OmegaConf.to_object(cfg))


if __name__ == "__main__":
    main()
