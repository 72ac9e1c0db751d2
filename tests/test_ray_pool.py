"""Where runs execute: each run's share of the machines, errors before anything starts, and real
placement on a local Ray whose 2 GPUs are declared (Ray hands them out as it would real ones)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from adaptalign.common.errors import ConfigurationError
from adaptalign.experiments.ray_pool import (
    Placement,
    WorkerPool,
    alive_nodes,
    check_answers,
    import_ray,
    share_of,
)
from tests.helpers.placement_probe import die_once, probe

CPU_NODE = {"CPU": 2.0, "memory": 1e10}
GPU_NODE = {"CPU": 16.0, "GPU": 8.0}


def test_a_machine_without_gpus_gives_each_run_its_cores_over_jobs() -> None:
    assert share_of(Placement(), [CPU_NODE], local=True) == share(2.0, 0.0, 1)
    assert share_of(Placement(jobs=2), [CPU_NODE], local=True) == share(1.0, 0.0, 2)
    assert share_of(Placement(jobs=3), [{"CPU": 8.0}], local=True) == share(2.0, 0.0, 3)
    # on a cluster a run holds one CPU unless told otherwise; slots add up over machines
    assert share_of(Placement(address="auto"), [CPU_NODE, CPU_NODE], local=False).slots == 4
    assert share_of(Placement(cpus_per_run=1.5), [{"CPU": 4.0}], local=True) == share(1.5, 0, 2)


def test_with_gpus_each_run_holds_one_and_ddp_runs_hold_several_on_one_machine() -> None:
    assert share_of(Placement(), [GPU_NODE], local=True) == share(1.0, 1.0, 8)
    assert share_of(Placement(gpus_per_run=2), [GPU_NODE, GPU_NODE], local=False) == share(
        1.0, 2.0, 8
    )
    assert share_of(Placement(gpus_per_run=3), [GPU_NODE], local=True).slots == 2  # 8 // 3
    assert share_of(Placement(jobs=3), [GPU_NODE], local=True).slots == 3
    assert share_of(Placement(gpus_per_run=0), [GPU_NODE], local=True).gpus == 0


def share(cpus: float, gpus: float, slots: int):
    from adaptalign.experiments.ray_pool import Share

    return Share(cpus, gpus, slots)


@pytest.mark.parametrize(
    ("placement", "nodes", "message"),
    [
        (Placement(gpus_per_run=4), [GPU_NODE, GPU_NODE][:1] * 2, None),  # 4 <= 8: fine
        (
            Placement(gpus_per_run=9),
            [GPU_NODE, GPU_NODE],
            "largest machine of the Ray cluster has 8 GPU",
        ),
        (Placement(gpus_per_run=1), [CPU_NODE], "has 0 GPU"),
        (Placement(cpus_per_run=4), [CPU_NODE], "--cpus-per-run 4: the largest machine"),
        (Placement(), [], "no live machine"),
    ],
)
def test_a_share_no_machine_can_give_is_refused_before_any_run(
    placement: Placement, nodes: list, message: str | None
) -> None:
    if message is None:
        assert share_of(placement, nodes, local=False).gpus == 4
        return
    with pytest.raises(ConfigurationError, match=message):
        share_of(placement, nodes, local=False)


@pytest.mark.parametrize(
    ("placement", "message"),
    [
        (Placement(jobs=0), "--jobs 0: expected >= 1"),
        (Placement(cpus_per_run=0), "--cpus-per-run 0: expected > 0"),
        (Placement(gpus_per_run=-1), "--gpus-per-run -1: expected >= 0"),
    ],
)
def test_impossible_values_are_refused_whatever_the_cluster(placement: Placement, message: str):
    with pytest.raises(ConfigurationError, match=message):
        placement.check()


def test_an_address_where_nothing_listens_is_refused_at_once() -> None:
    with socket.socket() as free:  # a port nobody listens on: bound, then released
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    with pytest.raises(ConfigurationError, match=rf"--address 127.0.0.1:{port}: no Ray cluster"):
        check_answers(f"127.0.0.1:{port}")
    with pytest.raises(ConfigurationError, match="expected auto or HOST:PORT"):
        check_answers("somewhere")


def test_without_ray_the_error_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as when it is not installed
    with pytest.raises(
        ConfigurationError, match=r"Ray is not installed.*pip install 'ray\[tune\]'"
    ):
        import_ray()


@pytest.fixture(scope="module")
def two_gpu_ray():
    """A local Ray with 3 CPUs and 2 declared GPUs; the code under test finds it connected."""
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    ray.init(num_cpus=3, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_two_runs_hold_a_gpu_each_at_once_and_a_third_waits(two_gpu_ray, tmp_path: Path) -> None:
    share = share_of(Placement(), alive_nodes(two_gpu_ray), local=True)
    assert (share.gpus, share.slots) == (1.0, 2)
    pool = WorkerPool(two_gpu_ray, share, Path.cwd())
    events = list(pool.run(["a", "b", "c"], probe, lambda name: (str(tmp_path), name, 2)))
    done = {e.item: e.value for e in events if e.kind == "done"}
    started = [e.item for e in events if e.kind == "started"]
    assert started == ["a", "b", "c"] and set(done) == {"a", "b", "c"}
    first, second, third = (done[name] for name in started)
    # the first two ran together, each on its own device, as Ray's placement line says
    assert first["running"] == second["running"] == 2
    assert {first["devices"], second["devices"]} == {"0", "1"}
    where = {e.item: e.where for e in events if e.kind == "started"}
    assert where["a"].endswith(f"GPU {first['devices']}")
    assert where["b"].endswith(f"GPU {second['devices']}")
    # the third started only once one of them had ended, on the device it gave back
    assert third["ended_before"] and set(third["started_before"]) == {"a", "b"}
    assert third["devices"] in {"0", "1"}


@pytest.mark.slow
def test_a_worker_that_dies_is_reported_lost_and_a_new_one_takes_the_retry(
    two_gpu_ray, tmp_path: Path
) -> None:
    share = share_of(Placement(jobs=1), alive_nodes(two_gpu_ray), local=True)
    pool = WorkerPool(two_gpu_ray, share, Path.cwd())
    kinds = []
    for event in pool.run(["x"], die_once, lambda name: (str(tmp_path), name)):
        kinds.append(event.kind)
        if event.kind == "lost":
            assert event.error is not None
            pool.again(event.item)
        if event.kind == "done":
            assert event.value == "x"
    assert kinds == ["started", "lost", "started", "done"]
