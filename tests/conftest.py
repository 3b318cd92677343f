"""Shared fixtures: every test must leave no worker process behind.

The check runs after each test: the default supervisors are closed, then
every process this test run started during the test (other than loky's
resource tracker, which lives as long as pytest, and the Ray test cluster's
own processes) must be gone within a few seconds.

``ray_cluster`` starts one real multi-node Ray cluster for the session (a
head with no CPUs, two worker nodes of one CPU each, labelled ``w1`` and
``w2``), bound to 127.0.0.1 with token authentication, under a short
temporary directory; it ends exactly the processes it started.
``backend_name`` parametrises a test over every backend (the conformance
suite).
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import pytest

import parstream

if TYPE_CHECKING:
    from collections.abc import Iterator

TESTS = Path(__file__).parent
RAY_MARKERS = (
    "raylet",
    "gcs_server",
    "ray::",
    "default_worker.py",
    "ray/_private",
    "ray/dashboard",
)


def _is_ray_process(p: psutil.Process) -> bool:
    try:
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return False
    return any(marker in cmd for marker in RAY_MARKERS)


def _descendants() -> dict[int, psutil.Process]:
    out = {}
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if "resource_tracker" in cmd or any(marker in cmd for marker in RAY_MARKERS):
            continue
        out[p.pid] = p
    return out


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Fail a test that leaves any process it started still running."""
    before = set(_descendants())
    yield
    for backend in ("local", "inline"):
        default = parstream.default_supervisor(backend, start=False)
        if default is not None:
            default.close()
    deadline = time.monotonic() + 5.0
    while True:
        left = {pid: p for pid, p in _descendants().items() if pid not in before}
        alive = []
        for p in left.values():
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.Error:
                pass
        if not alive:
            return
        if time.monotonic() > deadline:
            for p in alive:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            names = []
            for p in alive:
                try:
                    names.append((p.pid, " ".join(p.cmdline())[:80]))
                except psutil.Error:
                    names.append((p.pid, "?"))
            pytest.fail(f"processes outlived the test: {names}", pytrace=False)
        time.sleep(0.05)


@pytest.fixture
def sup() -> Iterator[parstream.Supervisor]:
    """A two-worker supervisor, closed after the test."""
    with parstream.Supervisor(max_workers=2) as s:
        yield s


# -- Ray ------------------------------------------------------------------------


@dataclass
class RayCluster:
    """The session's Ray cluster: ``cluster`` is Ray's ``Cluster``; ``nodes``
    maps each worker node's label value (``w1``, ``w2``) to its node id."""

    cluster: Any
    nodes: dict[str, str]
    address: str
    env: dict[str, str]  # what a driver process needs to join the cluster


def _ray_env(tmp: str) -> dict[str, str]:
    """Set before Ray is imported: loopback only, token auth, no files outside
    ``tmp``, no usage reporting; the tests' modules importable on workers."""
    env = {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": os.environ.get("RAY_AUTH_TOKEN") or secrets.token_hex(32),
        "RAY_TMPDIR": tmp,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DEDUP_LOGS": "0",
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p
        ),
    }
    os.environ.update(env)
    return env


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayCluster]:
    """A real three-node Ray cluster on this machine, for the whole session."""
    # Looked up, not imported: Ray reads its settings when first imported.
    if importlib.util.find_spec("ray") is None and os.environ.get("PARSTREAM_REQUIRE_RAY") != "1":
        pytest.skip("the ray extra is not installed")
    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # AF_UNIX paths: 107 bytes at most
    env = _ray_env(tmp)
    import ray
    from ray.cluster_utils import Cluster

    cluster = None
    try:
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 0,
                "no_monitor": True,
                "include_dashboard": False,
                "temp_dir": os.path.join(tmp, "ray"),
                "labels": {"role": "head"},
                # Node deaths are seen in about a second rather than 15 s.
                "_system_config": {
                    "health_check_period_ms": 500,
                    "health_check_failure_threshold": 3,
                    "health_check_timeout_ms": 500,
                },
            },
        )
        nodes = {}
        for name in ("w1", "w2"):
            node = cluster.add_node(num_cpus=1, labels={"role": "worker", "wname": name})
            nodes[name] = node.node_id
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield RayCluster(cluster, nodes, cluster.address, env)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            cluster.shutdown()  # type: ignore[no-untyped-call]
        shutil.rmtree(tmp, ignore_errors=True)  # also when the head failed to start


BACKENDS = ("local", "inline", "ray")


@pytest.fixture(params=BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    """Each backend in turn; the Ray one on the session's cluster."""
    name: str = request.param
    if name == "ray":
        request.getfixturevalue("ray_cluster")
    return name
