"""Where runs execute: a pool of Ray workers, each holding one run's share of a machine.

By default the command starts an embedded Ray on this machine and stops it at the end; with
``--address auto`` or ``--address HOST:PORT`` it joins a running cluster (``ray start --head`` on
one machine, ``ray start --address HOST:PORT`` on the others). Every worker is a Ray actor that
holds a run's resources for as long as it lives: one GPU per run when the cluster has GPUs (Ray
sets ``CUDA_VISIBLE_DEVICES`` for it, and the run sees only its own), otherwise a number of CPUs.
The driver hands each idle worker the next run, so it always knows how many runs are running and
how many wait, and a worker that dies (a pre-empted node) is replaced.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaptalign.common.allocator import ENVIRONMENT as ALLOCATOR_ENVIRONMENT
from adaptalign.common.errors import ConfigurationError

INSTALL_HINT = "pip install 'ray[tune]'"
CONNECT_SECONDS = 5.0
# See adaptalign.cli: idle OpenMP threads sleep, and freed large buffers are kept for reuse.
SHARED_ENV = ("OMP_WAIT_POLICY", *ALLOCATOR_ENVIRONMENT)


@dataclass(frozen=True)
class Placement:
    """How runs are placed: the cluster, runs at a time, each run's share, warm or fresh.

    ``None`` means the default: a local Ray; as many runs as the resources allow (one at a time
    on a machine without GPUs, where one run uses every core); one GPU per run when there are
    GPUs; warm workers.
    """

    address: str | None = None
    jobs: int | None = None
    cpus_per_run: float | None = None
    gpus_per_run: float | None = None
    warm: bool = True

    def check(self) -> None:
        """Values that cannot be right whatever the cluster; raised before Ray starts."""
        if self.jobs is not None and self.jobs < 1:
            raise ConfigurationError(f"--jobs {self.jobs}: expected >= 1")
        if self.cpus_per_run is not None and not self.cpus_per_run > 0:
            raise ConfigurationError(f"--cpus-per-run {self.cpus_per_run:g}: expected > 0")
        if self.gpus_per_run is not None and not self.gpus_per_run >= 0:
            raise ConfigurationError(f"--gpus-per-run {self.gpus_per_run:g}: expected >= 0")


@dataclass(frozen=True)
class Share:
    """What one run holds and how many runs go at once."""

    cpus: float
    gpus: float
    slots: int

    def describe(self) -> str:
        each = f"{self.cpus:g} CPU" + (f" + {self.gpus:g} GPU" if self.gpus else "")
        return f"{self.slots} at a time, each with {each}"


def add_placement_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that say where runs execute, shared by every command that executes runs."""
    group = parser.add_argument_group("where runs execute (Ray)")
    group.add_argument(
        "--address",
        metavar="auto|HOST:PORT",
        help="join a running Ray cluster (default: start a local Ray for this command)",
    )
    group.add_argument(
        "--jobs",
        type=int,
        help="runs at a time at most (default: as many as the resources allow; on a machine "
        "without GPUs 1, since one run uses every core)",
    )
    group.add_argument(
        "--cpus-per-run",
        type=float,
        metavar="N",
        help="CPUs each run holds (default: on a local machine without GPUs its cores / --jobs, "
        "else 1)",
    )
    group.add_argument(
        "--gpus-per-run",
        type=float,
        metavar="N",
        help="GPUs each run holds, all on one machine; more than 1 runs DDP over them "
        "(default: 1 when the cluster has GPUs, else 0)",
    )
    group.add_argument(
        "--workers",
        choices=("warm", "fresh"),
        default="warm",
        help="warm: each worker keeps its imports and runs fits in its own process, one after "
        "another (fast); fresh: a new process per run (isolated); runs over several devices "
        "always get their own (default: warm)",
    )


def placement_from(options: argparse.Namespace) -> Placement:
    placement = Placement(
        options.address,
        options.jobs,
        options.cpus_per_run,
        options.gpus_per_run,
        options.workers == "warm",
    )
    placement.check()
    return placement


def import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ConfigurationError(
            f"Ray is not installed; runs are placed by Ray: {INSTALL_HINT}"
        ) from exc
    return ray


def check_answers(address: str) -> None:
    """Refuses an address where nothing listens, before Ray waits minutes on it."""
    if address == "auto":
        return  # Ray finds the cluster of this machine or says there is none, at once
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigurationError(f"--address {address!r}: expected auto or HOST:PORT")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_SECONDS):
            pass
    except OSError as exc:
        raise ConfigurationError(
            f"--address {address}: no Ray cluster answers there ({exc}); start one with "
            "`ray start --head` on that machine, or leave --address out for a local Ray"
        ) from exc


@contextlib.contextmanager
def ray_session(address: str | None, env: dict[str, str] | None = None) -> Iterator[Any]:
    """Ray, connected: an existing connection of this process as it is, else a new one that
    ends with the block (an embedded local Ray when ``address`` is None). ``env``: variables
    every worker of this command gets, on whichever machine."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    quiet: dict[str, Any] = {
        "include_dashboard": False,
        "logging_level": logging.ERROR,
        "log_to_driver": False,
    }
    # What the command set for every process it starts reaches workers on other machines too.
    shared = {k: os.environ[k] for k in SHARED_ENV if k in os.environ}
    if shared or env:
        quiet["runtime_env"] = {"env_vars": {**shared, **(env or {})}}
    if address is None:
        ray.init(num_cpus=os.cpu_count() or 1, **quiet)
    else:
        check_answers(address)
        try:
            ray.init(address=address, **quiet)
        except ConnectionError as exc:
            raise ConfigurationError(f"--address {address}: {exc}") from exc
    try:
        yield ray
    finally:
        ray.shutdown()


def alive_nodes(ray: Any) -> list[dict[str, float]]:
    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def share_of(placement: Placement, nodes: Sequence[dict[str, float]], local: bool) -> Share:
    """Each run's CPUs and GPUs, and how many runs fit at once on these machines.

    A run's GPUs must be on one machine (DDP inside a run spans its own devices), so a request
    above the largest machine's count is refused here, before any run starts.
    """
    if not nodes:
        raise ConfigurationError("the Ray cluster has no live machine")
    most_gpus = max(node.get("GPU", 0.0) for node in nodes)
    most_cpus = max(node.get("CPU", 0.0) for node in nodes)
    gpus = placement.gpus_per_run
    if gpus is None:
        gpus = 1.0 if most_gpus > 0 else 0.0
    if gpus > most_gpus:
        raise ConfigurationError(
            f"--gpus-per-run {gpus:g}: the largest machine of the Ray cluster has "
            f"{most_gpus:g} GPU(s); a run's GPUs must be on one machine"
        )
    cpus = placement.cpus_per_run
    if cpus is None and local and not gpus:  # one machine: its cores shared by the runs at once
        cpus = max(1.0, math.floor(most_cpus / (placement.jobs or 1)))
    elif cpus is None:
        cpus = 1.0
    if cpus > most_cpus:
        raise ConfigurationError(
            f"--cpus-per-run {cpus:g}: the largest machine of the Ray cluster has "
            f"{most_cpus:g} CPUs"
        )
    slots = 0
    for node in nodes:
        fit = math.floor(node.get("CPU", 0.0) / cpus + 1e-9)
        if gpus:
            fit = min(fit, math.floor(node.get("GPU", 0.0) / gpus + 1e-9))
        slots += fit
    if placement.jobs is not None:
        slots = min(slots, placement.jobs)
    return Share(cpus, gpus, max(slots, 1))


def placed_share(ray: Any, placement: Placement) -> Share:
    """Each run's share on the machines this Ray connection sees."""
    return share_of(placement, alive_nodes(ray), local=placement.address is None)


class RunWorker:
    """A Ray actor that runs one piece of work at a time in the driver's working directory."""

    def __init__(self, cwd: str) -> None:
        # Relative config and output paths mean what they mean to the driver, and modules there
        # import as under ``python -m adaptalign`` (a callback of the user's own, say).
        os.chdir(cwd)
        sys.path.insert(0, cwd)

    def where(self) -> str:
        """The machine and the GPUs this worker holds, for the progress lines."""
        import ray

        context = ray.get_runtime_context()
        gpus = context.get_accelerator_ids().get("GPU") or []
        node = ray.util.get_node_ip_address()
        return f"{node}" + (f" GPU {','.join(gpus)}" if gpus else "")

    def call(self, function: Callable[..., Any], *args: Any) -> Any:
        return function(*args)


@dataclass
class Event:
    """A piece of work started on a worker (``where``), or ended with a value or an error."""

    kind: str  # "started", "done" or "lost" (the worker died: its machine went away)
    item: Any
    where: str = ""
    value: Any = None
    error: BaseException | None = None


class WorkerPool:
    """Hands pieces of work to idle workers, one each, and reports as they start and end."""

    def __init__(self, ray: Any, share: Share, cwd: Path) -> None:
        self.ray, self.share, self.cwd = ray, share, str(cwd)
        self.actor_class = ray.remote(RunWorker).options(
            num_cpus=share.cpus, num_gpus=share.gpus, max_restarts=0, max_concurrency=1
        )
        self.idle: list[tuple[Any, str]] = []
        self.workers = 0

    def new_worker(self) -> tuple[Any, str]:
        actor = self.actor_class.remote(self.cwd)
        return actor, self.ray.get(actor.where.remote())

    def run(
        self, items: Sequence[Any], function: Callable[..., Any], args: Callable[[Any], tuple]
    ) -> Iterator[Event]:
        """Runs ``function(*args(item))`` for every item and for every item :meth:`again` adds."""
        self.queue = list(items)
        busy: dict[Any, tuple[Any, Any, str]] = {}  # reference -> (item, actor, where)
        while self.queue or busy:
            while self.queue and len(busy) < self.share.slots:
                item = self.queue.pop(0)
                actor, where = self.idle.pop() if self.idle else self.new_worker()
                reference = actor.call.remote(function, *args(item))
                busy[reference] = (item, actor, where)
                yield Event("started", item, where)
            ready, _ = self.ray.wait(list(busy), num_returns=1)
            item, actor, where = busy.pop(ready[0])
            try:
                value = self.ray.get(ready[0])
            except self.ray.exceptions.RayActorError as exc:
                yield Event("lost", item, where, error=exc)
                continue  # the actor is gone; a new one takes the next item
            except self.ray.exceptions.RayTaskError as exc:
                self.idle.append((actor, where))
                yield Event("done", item, where, error=exc)
                continue
            self.idle.append((actor, where))
            yield Event("done", item, where, value=value)

    def again(self, item: Any) -> None:
        """Queues an item once more (a retry), ahead of the items not yet started."""
        self.queue.insert(0, item)


@contextlib.contextmanager
def worker_pool(placement: Placement) -> Iterator[WorkerPool]:
    """A pool placed as ``placement`` says, in the command's working directory, for the block."""
    with ray_session(placement.address) as ray:
        yield WorkerPool(ray, placed_share(ray, placement), Path.cwd())
