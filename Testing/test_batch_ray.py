"""``universalseg batch --engine ray`` on a local Ray cluster: 2 CPU actors, the demo model, 6 small cases;
one actor process is killed mid-batch and the batch still finishes every case exactly once."""
from __future__ import annotations

import os
import signal

import pytest

ray = pytest.importorskip("ray")

from UniversalSegLib.batch.run import run_batch  # noqa: E402

from test_batch import database, check_case_outputs, options, write_phantom  # noqa: E402


@pytest.fixture
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def test_ray_batch_survives_a_killed_worker(tmp_path, local_ray):
    inputs = tmp_path / "ct"
    inputs.mkdir()
    for seed in range(6):
        write_phantom(inputs / f"case{seed}.nii.gz", seed)
    out = tmp_path / "out"
    pools: list[list[int]] = []
    killed: list[int] = []

    def kill_the_other_worker(outcome):
        if killed:
            return
        finished_by = int(outcome.worker.rsplit(":", 1)[1])
        victim = next(pid for pid in pools[-1] if pid != finished_by)  # busy with its own case
        os.kill(victim, signal.SIGKILL)
        killed.append(victim)

    summary = run_batch([str(inputs)], options(out, engine="ray", workers=2, on_workers=pools.append),
                        on_outcome=kill_the_other_worker)
    assert killed and len(pools) >= 2 and killed[0] not in pools[-1]  # replaced by a fresh actor
    assert (summary.done, summary.failed) == (6, [])
    state = database(out)
    assert sorted(state) == [f"case{n}" for n in range(6)]
    for case, record in state.items():
        assert record["status"] == "done"
        check_case_outputs(out, case)
    # The killed actor's case was started twice and finished once; every other case ran once.
    assert sorted(r["runs"] for r in state.values()) == [1, 1, 1, 1, 1, 2]
