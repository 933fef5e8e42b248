"""What every config group's checks share: the error a bad value raises, and the one-line check.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is invalid; the message says which key and why."""


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
