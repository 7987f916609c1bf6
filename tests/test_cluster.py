"""A real two-node Ray cluster on this machine (`ray start --head` and a second `ray start --address`), S3 (moto on
127.0.0.1) as the storage both nodes share: a run spreads over both nodes; the second node's raylet is killed mid-run,
with the worker processes it started, and the run still ends with every row exactly once, the units that were on the
lost node done again elsewhere."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from blipbatch import pipeline
from blipbatch.pipeline.sink import progress_records, read_output
from tests.conftest import free_port, ray_bin, stop_cluster
from tiny import write_tiny_checkpoint

pytestmark = pytest.mark.slow

ROWS, ROWS_PER_UNIT = 96, 4
WORKERS = 4  # 0.5 CPU each: two fit on each 1-CPU node, so both nodes hold workers


def start_node(args: list[str], env: dict[str, str]) -> None:
    result = subprocess.run([ray_bin(), "start", "--disable-usage-stats", "--node-ip-address=127.0.0.1", *args], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def raylet_of(node_manager_port: int) -> psutil.Process:
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if cmdline and cmdline[0].endswith("raylet") and f"--node_manager_port={node_manager_port}" in cmdline:
            return process
    raise AssertionError(f"no raylet with node manager port {node_manager_port}")


@pytest.fixture
def two_nodes(moto_endpoint):
    """(address, the second node's node-manager port); both nodes see the moto endpoint through AWS_* variables."""
    temp = Path("/tmp") / f"bb-2node-{os.getpid()}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    port, second = free_port(), free_port()
    try:
        start_node(["--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                    f"--temp-dir={temp}"], env)
        start_node([f"--address=127.0.0.1:{port}", "--num-cpus=1", f"--node-manager-port={second}"], env)
        yield f"127.0.0.1:{port}", second
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        stop_cluster(str(temp))
        try:
            raylet_of(second).kill()
        except AssertionError:
            pass


def write_input(fs, bucket: str) -> str:
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)]
    images = []
    for i in range(ROWS):
        buffer = io.BytesIO()
        Image.new("RGB", (40 + i % 7, 30), colours[i % 4]).save(buffer, "PNG")
        images.append(buffer.getvalue())
    table = pa.table({"key": [f"row-{i:03d}" for i in range(ROWS)], "image": images})
    fs.mkdir(bucket)
    with fs.open(f"{bucket}/in/shard-0.parquet", "wb") as f:
        pq.write_table(table, f, row_group_size=ROWS_PER_UNIT)
    return f"s3://{bucket}/in/"


def test_run_over_two_nodes_survives_losing_one(two_nodes, s3fs_clean, tmp_path):
    import ray

    address, second_node = two_nodes
    checkpoint = str(write_tiny_checkpoint(tmp_path / "model"))
    source = write_input(s3fs_clean, "two-nodes")
    output = "s3://two-nodes/out/"
    killed = threading.Event()

    def workers_committed() -> set[str]:
        try:
            markers = s3fs_clean.ls("two-nodes/out/_progress", refresh=True)
        except FileNotFoundError:
            return set()
        return {json.loads(s3fs_clean.cat_file(marker))["timing"]["worker"] for marker in markers
                if not marker.endswith(".failed.json")}

    def kill_second_node_mid_run() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            # Three workers have committed: at most two fit a node, so both nodes have worked (on a loaded machine
            # the second node's workers can start late: a count of units alone may all be the head's).
            if len(workers_committed()) >= 3:
                # The node goes down whole: its raylet and the worker processes it started.
                raylet = raylet_of(second_node)
                for process in [*raylet.children(recursive=True), raylet]:
                    process.send_signal(signal.SIGKILL)
                killed.set()
                return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_second_node_mid_run, daemon=True)
    killer.start()
    started = time.monotonic()
    summary = pipeline.run(source, output, checkpoint, prompt="A short image caption:", image_column="image",
                           id_column="key", rows_per_unit=ROWS_PER_UNIT, workers=WORKERS, max_new_tokens=3,
                           batch_size=2, address=address, progress=False)
    killer.join(timeout=5)
    assert killed.is_set(), "the run ended before the second node could be killed"
    assert time.monotonic() - started < 400

    rows = read_output(output).to_pylist()
    ids = [row["id"] for row in rows]
    assert sorted(ids) == [f"row-{i:03d}" for i in range(ROWS)]  # every row exactly once
    assert [row for row in rows if row["status"] != "ok"] == []
    assert summary.units_failed == 0
    records = progress_records(output)
    assert len(records) == ROWS // ROWS_PER_UNIT
    # Both nodes worked (each marker names its worker, and at most two workers fit a 1-CPU node) ...
    assert len({record.timing.worker for record in records}) >= 3
    # ... and what the lost node held was done again by a worker on the node that stayed.
    assert any(record.attempt >= 2 for record in records)
    # The kill really took a node down (the cluster notices within its health-check period).
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and second_node_alive(second_node):
        time.sleep(1)
    assert not second_node_alive(second_node)


def second_node_alive(node_manager_port: int) -> bool:
    import ray

    return any(node["Alive"] for node in ray.nodes() if node["NodeManagerPort"] == node_manager_port)
