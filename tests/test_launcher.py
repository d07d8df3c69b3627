"""How `LocalCluster` lays out its processes (no process is started here)."""

from __future__ import annotations

from moe_cluster import LocalCluster


def _option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_workers_take_shards_and_devices_in_turn(tmp_path):
    cluster = LocalCluster(
        tmp_path, workers=2, replicas=3, device="cuda:0", worker_devices=("cuda:1", "cuda:2")
    )
    args = [cluster._worker_args(i) for i in range(cluster.num_workers)]
    assert [_option(a, "--shard") for a in args] == ["0/2", "1/2"] * 3
    assert [_option(a, "--device") for a in args] == ["cuda:1", "cuda:2"] * 3
    plain = LocalCluster(tmp_path, workers=2, device="cuda:0")
    assert {_option(plain._worker_args(i), "--device") for i in range(2)} == {"cuda:0"}
