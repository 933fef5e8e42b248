"""The `cluster` group: where replicas run, what each reserves, and when a stalled one is ended (conf/cluster/).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from lmbatch.config.checks import require


@dataclass
class ClusterConfig:
    address: Optional[str] = None
    """Ray cluster to attach to; null uses RAY_ADDRESS when set, else starts a local Ray."""
    num_replicas: int = 2
    """Model replicas (Ray actors), each holding one copy of the model."""
    gpus_per_replica: float = 0
    """GPUs reserved per replica; 0 runs on CPU."""
    cpus_per_replica: float = 0.5
    """CPUs reserved per replica. Leave room for Ray's readers: a pool holding every CPU deadlocks."""
    torch_threads: Optional[int] = None
    """Torch intra-op threads per replica; null means max(1, round(cpus_per_replica))."""
    prepare_cpus: float = 0.25
    """CPUs reserved by each read+prepare task (at most num_replicas of them run at once)."""
    stall_timeout_s: Optional[float] = 1800
    """A replica whose generation makes no progress (no micro-batch done, or a chunk's part not
    written) for this long ends its process, printing every thread's stack: a hung GPU kernel, a
    deadlock in native code or a write to a hung mount would otherwise stall the job forever. Ray
    restarts it and retries the chunk; a chunk that stalls again is generated a row at a time, so
    the row that hangs becomes an error row. A chunk's input not read (and prepared) in this long, as
    from a hung mount, stops the job naming its files. Set it well above the slowest micro-batch;
    null: never."""
    load_timeout_s: Optional[float] = 3600
    """A replica whose start (its check that it sees the output, then the model load from disk,
    network storage or the hub) has not finished after this long ends its process, printing every
    thread's stack, as a stalled one does: a hung mount or download would otherwise keep the job at
    `replicas starting` forever. Ray starts it again; a replica whose loads die or hang twice in a
    row, while none has the model loaded, stops the job. Set it well above the slowest load (a
    140 GB model at 200 MB/s takes 12 minutes); null: never."""

    def __post_init__(self) -> None:
        require(self.num_replicas >= 1, f"cluster.num_replicas must be >= 1, got {self.num_replicas}")
        require(self.gpus_per_replica >= 0, f"cluster.gpus_per_replica must be >= 0, got {self.gpus_per_replica}")
        require(self.cpus_per_replica > 0, f"cluster.cpus_per_replica must be > 0, got {self.cpus_per_replica}")
        require(self.prepare_cpus > 0, f"cluster.prepare_cpus must be > 0, got {self.prepare_cpus}")
        require(self.stall_timeout_s is None or self.stall_timeout_s > 0,
                 f"cluster.stall_timeout_s must be > 0 or null, got {self.stall_timeout_s}")
        require(self.load_timeout_s is None or self.load_timeout_s > 0,
                 f"cluster.load_timeout_s must be > 0 or null, got {self.load_timeout_s}")
        require(self.torch_threads is None or self.torch_threads >= 1,
                 f"cluster.torch_threads must be >= 1 or null, got {self.torch_threads}")

    @property
    def threads(self) -> int:
        return self.torch_threads or max(1, round(self.cpus_per_replica))
