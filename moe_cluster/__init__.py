"""moe-cluster: run a router and its expert workers on one machine, and the `moe-cluster` CLI.

from moe_cluster import LocalCluster
with LocalCluster(model_dir, workers=2) as cluster:
    ...  # talk to cluster.address with moe_client.Client
"""

from moe_cluster.launcher import ClusterStartError, LocalCluster

__all__ = ["ClusterStartError", "LocalCluster"]
