"""The repository, its configs, and configs composed and run as a user runs them."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


CONF = REPO / "conf"


def compose(*overrides: str):
    """Compose the real primary config with overrides, as `python jobs/generate.py ...` would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from lmbatch.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="generate", overrides=list(overrides))
