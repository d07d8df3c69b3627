"""The `moe-cluster` command line, run as real processes: demo, up + generate, and its errors."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from moe_client import Client

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "moe_cluster", *args]


def env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, **extra)


def test_demo_streams_text_reports_throughput_and_the_expert_load(tmp_path):
    done = subprocess.run(
        cli("demo"),
        env=env(MOE_CLUSTER_CACHE=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    streamed = re.search(r"^output: (.*)$", out, re.MULTILINE)
    assert streamed and streamed.group(1).strip(), out
    assert re.search(r"prefill [\d,]+ tokens/s, decode [\d,]+ tokens/s", out), out
    load_rows = re.findall(r"^\s+127\.0\.0\.1:\d+\s+(\S+)\s+True\s+(\d+)", out, re.MULTILINE)
    assert [experts for experts, _ in load_rows] == ["0-7", "8-15"], out
    assert all(int(tokens) > 0 for _, tokens in load_rows), out
    assert "cluster stopped" in out
    assert (tmp_path / "demo-model" / "tokenizer.json").is_file()


class Output:
    """Lines of a process's stdout, read on a thread so that waiting for one can time out."""

    def __init__(self, stream) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.put(line)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                continue
            self.seen.append(line)
            match = re.search(pattern, line)
            if match:
                return match
        raise AssertionError(f"no line matched {pattern!r}; output:\n{''.join(self.seen)}")


def test_up_serves_generate_talks_to_it_and_sigterm_stops_every_process(checkpoints):
    model_dir = checkpoints.get("qwen2_moe")
    up = subprocess.Popen(
        cli("up", "--model", str(model_dir), "--workers", "2", "--port", "0", "--device", "cpu")
        + ["--forwarders", "1", "--fronts", "1"],
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    children: list[int] = []
    try:
        output = Output(up.stdout)
        address = output.wait_for(r"serving \S+ \(qwen2_moe\) on (\S+)", timeout=180).group(1)
        metrics_urls = {}
        for name in ("router", "worker-0", "worker-1"):
            row = output.wait_for(rf"^\s+{name}\s+(\d+)\s+\S+\s+(\S+)\s", timeout=10)
            children.append(int(row.group(1)))
            metrics_urls[name] = row.group(2)

        gen = subprocess.run(
            cli("generate", "--address", address, "--token-ids", "--max-new-tokens", "5")
            + ["--ignore-eos", "3 1 4 1 5"],
            env=env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert gen.returncode == 0, gen.stderr
        with Client(address) as client:
            expected = client.generate(token_ids=[3, 1, 4, 1, 5], max_new_tokens=5, ignore_eos=True)
        assert [int(t) for t in gen.stdout.split()] == expected.token_ids
        assert "[length: 5 tokens after 5 prompt tokens" in gen.stderr

        def scrape(name: str) -> str:
            assert re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", metrics_urls[name])
            with urllib.request.urlopen(metrics_urls[name], timeout=10) as reply:
                return reply.read().decode()

        router_metrics = scrape("router")
        assert 'moe_router_requests_total{method="Generate",outcome="ok"} 2.0' in router_metrics
        assert "moe_router_forwarder_starts_total 1.0" in router_metrics
        for worker in ("worker-0", "worker-1"):
            assert re.search(r"^moe_worker_batches_total [1-9]", scrape(worker), re.MULTILINE)

        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0
    finally:
        if up.poll() is None:  # an assertion failed: let it stop its children, then insist
            up.terminate()
            try:
                up.wait(timeout=30)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait()
        for pid in children:  # never leave a child behind, even when an assertion failed
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            else:
                pytest.fail(f"process {pid} outlived `moe-cluster up`")


def test_up_with_a_missing_model_folder_exits_with_a_clear_message():
    done = subprocess.run(
        cli("up", "--model", "/nonexistent"), env=env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "/nonexistent" in done.stderr and "does not exist" in done.stderr


def test_generate_against_no_router_fails_with_unavailable():
    done = subprocess.run(
        cli("generate", "--address", "127.0.0.1:1", "--timeout", "10", "hello"),
        env=env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "UNAVAILABLE" in done.stderr
