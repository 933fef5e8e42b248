"""What the replicas need against what the machine or the Ray cluster has: GPUs, CPUs, memory.

Ray Data starts a pool's actors as resources allow and says nothing of those that wait, so a job
whose replicas cannot start, or leave no CPU to read their input, would wait forever. These checks
name the problem before the output is touched: an error where nothing can change it (the local Ray
a job starts), a warning where the cluster may grow (an autoscaler adds nodes for what waits).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Optional

from lmbatch.config import ClusterConfig, JobConfig
from lmbatch.errors import JobError
from lmbatch.models import parameter_count
from lmbatch.models.remote import is_remote
from lmbatch.plan.job import JobPlan


def ray_address(job: JobConfig) -> Optional[str]:
    """The Ray the job attaches to: `cluster.address`, else RAY_ADDRESS; None: it starts its own."""
    return job.cluster.address or os.environ.get("RAY_ADDRESS") or None


def starts_own_ray(job: JobConfig) -> bool:
    """Whether the job's Ray is one it starts on this machine (which nothing joins)."""
    return ray_address(job) in (None, "local")


def gpu_mismatch(cluster: ClusterConfig, gpus: float, replicas: int) -> Optional[str]:
    """What is wrong between the replicas and the Ray cluster's GPUs, if anything: GPUs left idle, or
    replicas that cannot start. Ray Data starts a pool's actors as resources allow, so replicas that
    need GPUs the cluster lacks wait, without a word, until GPUs join (an autoscaler adds them)."""
    per = cluster.gpus_per_replica
    if gpus and not per:
        return (f"the Ray cluster has GPUs ({gpus:g}), but cluster.gpus_per_replica=0: replicas run on CPU "
                "(for the GPUs: cluster=gpu_node)")
    fit = int(gpus // per) if per else replicas
    if fit < replicas:
        return (f"{replicas} replicas x {per:g} GPUs need {replicas * per:g}, the Ray cluster has {gpus:g}: "
                f"{f'only {fit} replicas' if fit else 'no replica'} can start until GPUs join the cluster "
                "(or lower cluster.num_replicas)")
    return None


def memory_shortfall(job: JobConfig, parameters: int, available: int) -> Optional[str]:
    """Whether the replicas' copies of the weights alone exceed the `available` memory of this
    machine, in a job that runs its replicas here, on CPU: they would be killed as they load."""
    dtype = job.replica_dtype
    per_replica = parameters * (4 if dtype == "float32" else 2)
    replicas = job.cluster.num_replicas
    if per_replica * replicas <= available:
        return None
    return (f"{replicas} replicas x {per_replica / 1e9:.1f} GB of {dtype} weights need more memory than this "
            f"machine has available ({available / 1e9:.1f} GB): replicas will be killed as they load; lower "
            f"cluster.num_replicas{' or use model.dtype=bfloat16' if dtype == 'float32' else ''}")


def memory_shortfall_here(job: JobConfig) -> Optional[str]:
    """memory_shortfall for a job with its replicas on this machine's CPUs and a local model
    directory or one in a bucket (its safetensors headers give the parameters); None for any other."""
    here = starts_own_ray(job) and not job.cluster.gpus_per_replica
    on_disk = os.path.isdir(job.model.path) or is_remote(job.model.path)
    parameters = parameter_count(job.model.path) if here and on_disk else None
    available = available_memory() if parameters else None
    return memory_shortfall(job, parameters, available) if available else None


def available_memory() -> Optional[int]:
    """Bytes of memory available here (Linux), within this container's limit if it has one."""
    found = []
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    with contextlib.suppress(OSError, ValueError):  # cgroup v2; "max" (no limit) fails int()
        limit, current = (Path(f"/sys/fs/cgroup/memory.{n}").read_text() for n in ("max", "current"))
        found.append(int(limit) - int(current))
    return min(found, default=None)


def cpu_shortfall(cluster: ClusterConfig, cpus: float, gpus: float, replicas: int) -> Optional[str]:
    """Whether the replicas that can start leave no CPU for a read+prepare task, or none can start
    for want of CPUs: either way the job would wait forever (Ray Data starts a pool's actors as
    resources allow, and their chunks must be read and tokenized first)."""
    per = cluster.cpus_per_replica
    if per > cpus:
        return (f"no replica can start: each takes {per:g} CPUs (cluster.cpus_per_replica), the Ray cluster has "
                f"{cpus:g}")
    fit = min(replicas, int(cpus // per) if per else replicas,
              int(gpus // cluster.gpus_per_replica) if cluster.gpus_per_replica else replicas)
    left = round(cpus - fit * per, 4)  # Ray counts resources in 1/10,000ths
    if left >= cluster.prepare_cpus:
        return None
    return (f"replicas of cluster.cpus_per_replica={per:g} take {fit * per:g} of the Ray cluster's {cpus:g} CPUs "
            f"({fit} of cluster.num_replicas={replicas} fit), and the {left:g} left are less than reading and "
            f"tokenizing a chunk takes (cluster.prepare_cpus={cluster.prepare_cpus:g}): the replicas would wait for "
            "input forever; lower cluster.num_replicas or cluster.cpus_per_replica")


def check_cluster(plan: JobPlan, local: bool) -> None:
    """What is wrong between the replicas and the Ray cluster, said before the output is touched.
    A local Ray never grows, so there a job that would wait forever stops (a JobError); a cluster
    may grow (an autoscaler adds nodes for what waits), so there it is a warning."""
    import ray

    job, resources = plan.job, ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    mismatch = gpu_mismatch(job.cluster, gpus, plan.replicas)
    shortfall = cpu_shortfall(job.cluster, cpus, gpus, plan.replicas)
    no_gpu_fits = gpus < job.cluster.gpus_per_replica  # (then mismatch says so)
    if local and (no_gpu_fits or shortfall):
        raise JobError(f"{mismatch if no_gpu_fits else shortfall} (the local Ray this job started never grows)")
    if mismatch and job.engine == "hf":
        print(f"lmbatch: warning: {mismatch}")
    if shortfall:
        print(f"lmbatch: warning: {shortfall}, unless nodes join the cluster")
