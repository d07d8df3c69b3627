"""torch's CPU operator threads in the serving processes (moe_core.host_threads, --cpu-threads).

On a GPU a process does only small host work, and a pool of one thread per core in each of a
dozen processes on one host costs more than it saves; the default there is one thread. On a CPU
torch keeps its default, and so does a process started with OMP_NUM_THREADS.
"""

from __future__ import annotations

import os

import pytest
import torch

from expert_worker.config import WorkerConfig
from moe_cluster import LocalCluster
from moe_core.host_threads import GPU_DEFAULT, apply_cpu_threads, cpu_threads_for
from router.main import build_parser, config_from_args


def test_one_thread_on_a_gpu_torchs_default_on_a_cpu_or_with_omp_num_threads():
    assert cpu_threads_for("cuda", environ={}) == GPU_DEFAULT == 1
    assert cpu_threads_for("cuda:1", environ={}) == 1
    assert cpu_threads_for("cpu", environ={}) is None
    assert cpu_threads_for("cuda", environ={"OMP_NUM_THREADS": "4"}) is None
    assert cpu_threads_for("cuda", 6, environ={"OMP_NUM_THREADS": "4"}) == 6  # the flag wins
    assert cpu_threads_for("cpu", 3, environ={}) == 3
    with pytest.raises(ValueError, match="at least 1, got 0"):
        cpu_threads_for("cpu", 0)


def test_apply_sets_torchs_threads():
    before = torch.get_num_threads()
    try:
        assert apply_cpu_threads("cpu", 3) == 3 == torch.get_num_threads()
        assert apply_cpu_threads("cpu") == 3  # nothing asked on a CPU: left as it is
    finally:
        torch.set_num_threads(before)


def test_configs_refuse_a_thread_count_below_one(tmp_path):
    args = ["serve", "--model", str(tmp_path), "--workers", "127.0.0.1:1", "--cpu-threads", "0"]
    with pytest.raises(ValueError, match="cpu threads must be at least 1"):
        config_from_args(build_parser().parse_args(args))
    assert config_from_args(build_parser().parse_args(args[:-1] + ["5"])).cpu_threads == 5
    with pytest.raises(ValueError, match="cpu threads must be at least 1"):
        WorkerConfig(model_dir=tmp_path, expert_ids=(0,), cpu_threads=0)


def test_router_and_worker_processes_use_the_threads_they_are_given(checkpoints):
    given = max(1, (os.cpu_count() or 1) // 2) + 2  # not what the launcher would give 2 processes
    threads = ("--cpu-threads", str(given))
    with LocalCluster(
        checkpoints.get("deepseek_v3"), workers=1, router_args=threads, worker_args=threads
    ) as cluster:
        for process in (cluster.router, *cluster.workers):
            assert f"on cpu, {given} CPU threads" in process.log_tail(), process.log_tail()
