"""Scale benchmark: the pipeline's own cost and memory at growing row counts (engine=echo by default).

    python jobs/scale.py                                   # 10k, 100k and 1M rows (1,000 files at 1M)
    python jobs/scale.py sizes=[20000,100000]              # quicker
    python jobs/scale.py engine=hf sizes=[100000]          # the real tiny model, a few new tokens per row
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from lmbatch.bench.scale import register_config, run_scale  # noqa: E402

register_config()


@hydra.main(config_path="../conf", config_name="scale", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_scale(OmegaConf.to_object(cfg))


if __name__ == "__main__":
    main()
