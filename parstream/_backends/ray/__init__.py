"""The Ray backend: the same tasks, streams and Supervisor on a Ray cluster.

``RayBackend`` is the user's handle (``backend=parstream.RayBackend(...)`` or
``backend="ray"``); each Supervisor opens a ``_pool.RayPool`` from it. This
module imports Ray only inside ``open``: ``import parstream`` never does.
``_runner`` is what runs on the Ray workers.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from parstream._backend import Backend, Settings

_lock = threading.Lock()
_users = 0  # open pools on a Ray instance that parstream started itself
_init_env: dict[str, Any] | None = None  # the runtime_env parstream gave ray.init


@dataclass(frozen=True)
class RayBackend:
    """Run tasks on a Ray cluster, with the promises of the local backend.

    Args:
        address: the cluster to connect to: ``"auto"``, ``"ray://host:port"``
            or a GCS address. None: ``RAY_ADDRESS`` if set, else a local Ray
            instance started for this process (and shut down with its last
            Supervisor). If Ray is already initialised in this process, that
            connection is used and this is ignored.
        runtime_env: Ray's ``runtime_env`` for the tasks: how code and
            settings reach the workers (``working_dir``, ``py_modules``,
            ``pip``, ``env_vars``). Functions defined in ``__main__``, a
            notebook, lambdas and closures travel by value and need none of
            it; functions from your own modules need them importable there.
        num_cpus_per_task: CPUs Ray reserves for each task; the default
            ``max_workers`` is the cluster's CPUs divided by this.
        init_kwargs: more keyword arguments for ``ray.init`` when this
            backend connects or starts Ray.

    Every task runs with ``max_retries=0`` (the Supervisor decides
    restarts); a timeout or a kill force-cancels the task's worker process.
    Differences from the local backend: ``Worker.pid`` is None (processes
    are on other machines); ``max_tasks_per_worker`` and
    ``max_memory_per_worker`` are refused; ``restart_workers()`` does
    nothing (Ray owns its processes).

    Example::

        ray_be = parstream.RayBackend(address="auto", runtime_env={"working_dir": "."})
        with parstream.Supervisor(backend=ray_be) as sup:
            print(list(sup.stream_map(work, items)))
    """

    address: str | None = None
    runtime_env: Mapping[str, Any] | None = None
    num_cpus_per_task: float = 1
    init_kwargs: Mapping[str, Any] | None = None

    name = "ray"

    def __hash__(self) -> int:
        # By value, so that default supervisors are shared by equal configs
        # (runtime_env is a dict: its repr stands in for it).
        return hash(
            (self.address, repr(self.runtime_env), self.num_cpus_per_task, repr(self.init_kwargs))
        )

    def __post_init__(self) -> None:
        if self.address is not None and not isinstance(self.address, str):
            raise TypeError(f"address must be a str or None, got {self.address!r}")
        if self.runtime_env is not None and not isinstance(self.runtime_env, dict):
            raise TypeError(f"runtime_env must be a dict or None, got {self.runtime_env!r}")
        if self.init_kwargs is not None and not isinstance(self.init_kwargs, Mapping):
            raise TypeError(f"init_kwargs must be a dict or None, got {self.init_kwargs!r}")
        for name in ("address", "runtime_env"):
            if self.init_kwargs and name in self.init_kwargs and getattr(self, name) is not None:
                # One would silently win over the other.
                raise ValueError(f"{name} is given twice: as {name}= and in init_kwargs")
        cpus = self.num_cpus_per_task
        if isinstance(cpus, bool) or not isinstance(cpus, int | float):
            raise TypeError(f"num_cpus_per_task must be a number, got {cpus!r}")
        if not math.isfinite(cpus) or cpus < 0:  # NaN passes every comparison
            raise ValueError(f"num_cpus_per_task must be a finite number >= 0, got {cpus}")

    def open(self, settings: Settings) -> Backend:
        for option, named in (
            # (the first under either of its names: ProcessPoolExecutor's too)
            ("max_tasks_per_worker", "max_tasks_per_worker (max_tasks_per_child)"),
            ("max_memory_per_worker", "max_memory_per_worker"),
        ):
            if getattr(settings, option) is not None:
                raise ValueError(f"{named} is not supported by the ray backend")
        try:
            import ray
        except ImportError as exc:  # pragma: no cover - the extra is missing
            raise ImportError("the ray backend needs Ray: pip install 'parstream[ray]'") from exc
        import parstream
        from parstream._backends.ray._pool import RayPool

        if parstream._forked_with_ray:
            raise RuntimeError(
                "this process was forked from one that had Ray initialised, and Ray's "
                "connection does not survive os.fork(): use the ray backend from the "
                "parent, or start this process with spawn (multiprocessing's 'spawn' "
                "or 'forkserver' start method)"
            )
        started = _connect(ray, self)
        try:
            return RayPool(settings, self, started_ray=started)
        except BaseException:
            if started:
                release_ray()
            raise

    def __repr__(self) -> str:
        return f"RayBackend(address={self.address!r})"


def _connect(ray: Any, config: RayBackend) -> bool:
    """Connect to (or start) Ray unless connected; True if parstream started it."""
    global _users
    with _lock:
        if ray.is_initialized():
            if _users:
                _users += 1
                return True
            return False
        kwargs: dict[str, Any] = {"log_to_driver": True}
        address = config.address or os.environ.get("RAY_ADDRESS")
        if address is not None:
            kwargs["address"] = address
        else:  # a local instance of our own: no dashboard to expose
            kwargs["include_dashboard"] = False
        kwargs.update(config.init_kwargs or {})
        if config.runtime_env is not None:
            kwargs["runtime_env"] = dict(config.runtime_env)
        ray.init(**kwargs)
        global _init_env
        _init_env = kwargs.get("runtime_env")
        _users = 1
        return True


def task_runtime_env(config: RayBackend) -> dict[str, Any] | None:
    """The runtime_env a pool must give each task: ``config``'s, unless Ray
    was started with that very one (then it is the job's already)."""
    env = None if config.runtime_env is None else dict(config.runtime_env)
    if env is None or env == _init_env:
        return None
    return env


def release_ray() -> None:
    """An open pool on a Ray instance parstream started has closed."""
    global _users, _init_env
    with _lock:
        _users -= 1
        if _users > 0:
            return
        _users = 0
        _init_env = None
    import ray

    ray.shutdown()
