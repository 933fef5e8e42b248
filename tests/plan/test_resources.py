"""The cluster's resources checked before replicas start: GPUs that do not match the replicas, replicas
that leave no CPU to read their input.
"""


import pytest

from lmbatch.config import ClusterConfig
from lmbatch.plan.resources import cpu_shortfall, gpu_mismatch


@pytest.mark.parametrize("gpus,per_replica,replicas,expected", [
    (8, 0, 2, "the Ray cluster has GPUs (8), but cluster.gpus_per_replica=0: replicas run on CPU"),
    (4, 1, 8, "8 replicas x 1 GPUs need 8, the Ray cluster has 4: only 4 replicas can start until GPUs join"),
    (3, 0.5, 8, "only 6 replicas can start"),
    (0, 1, 2, "no replica can start until GPUs join the cluster"),
    (8, 1, 8, None), (0, 0, 2, None), (8, 2, 4, None),
])
def test_replicas_and_the_clusters_gpus_that_do_not_match_are_named(gpus, per_replica, replicas, expected):
    found = gpu_mismatch(ClusterConfig(num_replicas=replicas, gpus_per_replica=per_replica), gpus, replicas)
    assert found == expected if expected is None else expected in found


@pytest.mark.parametrize("cpus,gpus,per_replica,replicas,expected", [
    (2, 0, 0.5, 2, None), (2, 0, 0.5, 3, None), (16, 4, 2, 8, None),  # the last: 4 GPUs, so 4 replicas start
    (2, 0, 0.5, 8, "take 2 of the Ray cluster's 2 CPUs (4 of cluster.num_replicas=8 fit), and the 0 left are less"),
    (2, 0, 0.6, 3, "take 1.8 of the Ray cluster's 2 CPUs (3 of cluster.num_replicas=3 fit), and the 0.2 left"),
    (16, 8, 2, 8, "(8 of cluster.num_replicas=8 fit), and the 0 left are less than reading and tokenizing a chunk "
                  "takes (cluster.prepare_cpus=1)"),
    (2, 0, 3, 1, "no replica can start: each takes 3 CPUs (cluster.cpus_per_replica), the Ray cluster has 2"),
])
def test_replicas_that_leave_no_cpu_to_read_their_input_are_named(cpus, gpus, per_replica, replicas, expected):
    prepare_cpus = 1 if gpus else 0.25  # as in cluster=gpu_node and cluster=local
    cluster = ClusterConfig(num_replicas=replicas, gpus_per_replica=1 if gpus else 0, cpus_per_replica=per_replica,
                            prepare_cpus=prepare_cpus)
    found = cpu_shortfall(cluster, cpus, gpus, replicas)
    assert found == expected if expected is None else expected in found
