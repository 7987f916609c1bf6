import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Tests never reach the network: fail fast if anything tries the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def oracle_line() -> str:
    from importlib.metadata import version

    return f"test oracle: transformers {version('transformers')} (pinned in pyproject.toml; see tests/ORACLE.md)"


def pytest_report_header(config) -> str:
    return oracle_line()


def pytest_sessionstart(session) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and reporter.verbosity < 0:  # -q (what CI runs) hides the header: say it anyway
        reporter.write_line(oracle_line())


def stop_cluster(temp_dir: str) -> None:
    """Kill this cluster's processes (those naming its temp dir, and their children) and no other Ray:
    `ray stop` would stop every Ray on the machine."""
    import psutil  # ships with ray[default]

    mine = []
    for process in psutil.process_iter(["cmdline"]):
        if any(temp_dir in part for part in process.info["cmdline"] or []):
            mine.append(process)
            mine.extend(process.children(recursive=True))
    for process in mine:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(mine, timeout=30)


def ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The environment of a test's `ray start`: no token (the tests' clients have none), and workers at normal priority
# as README advises for nodes that run other work (Ray's nice 15 starves them beside the suite's other processes).
RAY_NODE_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_worker_niceness": "0"}


def agent_port_flags() -> list[str]:
    """`ray start` flags giving a node's agents free ports: their defaults are fixed (52365, ...), and a node whose
    agent finds its port taken by another cluster on the machine (a test beside this one) loses its raylet."""
    return [
        f"--{name}={free_port()}"
        for name in (
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "metrics-export-port",
            "runtime-env-agent-port",
        )
    ]


def wait_for_port(port: int, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    pytest.fail(f"{what} did not start within {timeout:.0f} s")


@pytest.fixture(scope="session")
def moto_endpoint():
    """One real S3 endpoint (moto server on 127.0.0.1) for the whole session.

    The AWS_* variables are set process-wide, before any Ray worker starts, so actors see the
    same endpoint as the test process."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    saved = {
        name: os.environ.get(name)
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
    }
    try:
        wait_for_port(port, "moto server")
        os.environ.update(
            {
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_ENDPOINT_URL": endpoint,
                "AWS_DEFAULT_REGION": "us-east-1",
            }
        )
        yield endpoint
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
def s3fs_clean(moto_endpoint):
    """An s3fs filesystem on the moto endpoint, with fsspec's instance cache cleared around the test."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # fsspec would reuse a filesystem bound to another endpoint
    yield s3fs.S3FileSystem(endpoint_url=moto_endpoint)
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def ray_local(moto_endpoint):
    """One in-process Ray for the module, started after the S3 variables are set so actors see them."""
    import ray

    from blipbatch.pipeline.run import connect_ray

    connect_ray(None, num_cpus=2)
    yield
    ray.shutdown()
