"""The `storage` group: how patiently requests to an object store (the input, the output, the model) are
tried again through throttling, dropped connections and timeouts (`lmbatch.retrying`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lmbatch.config.checks import require
from lmbatch.retrying import RetryPolicy

_DEFAULT = RetryPolicy()


@dataclass
class StorageConfig:
    attempts: int = _DEFAULT.attempts
    """Attempts of each storage operation (a read, a write, a listing) that fails on a transient fault: 503
    SlowDown or 429, a dropped or reset connection, a timeout, a 5xx. A fault that is not transient (403, 404,
    no such bucket, an endpoint that does not resolve) fails at once. On s3:// each attempt's HTTP requests are
    also retried by the AWS SDK (3 times). 1: no retries of lmbatch's own."""
    base_delay_s: float = _DEFAULT.base_delay_s
    """Wait after the first failed attempt; it doubles after each next one (half of it random)."""
    max_delay_s: float = _DEFAULT.max_delay_s
    """The longest wait between two attempts."""
    request_timeout_s: float = _DEFAULT.request_timeout_s
    """An s3:// request that connects or answers no more in this long is given up and tried again (a
    connection dropped where no reset reaches the client would hang otherwise)."""

    def __post_init__(self) -> None:
        require(self.attempts >= 1, f"storage.attempts must be >= 1, got {self.attempts}")
        require(0 <= self.base_delay_s <= self.max_delay_s,
                f"storage.base_delay_s must be between 0 and storage.max_delay_s, got {self.base_delay_s} "
                f"and {self.max_delay_s}")
        require(self.request_timeout_s > 0, f"storage.request_timeout_s must be > 0, got {self.request_timeout_s}")

    @property
    def policy(self) -> RetryPolicy:
        return RetryPolicy(**asdict(self))
