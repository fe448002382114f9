"""The Ray engine: the same per-case work in Ray actors that each load the model once.

The driver (this process) keeps the database and hands one case at a time to each idle actor. Actors
ask for one GPU each when the cluster has GPUs and the device is not ``cpu``, else ``threads`` CPUs
(default 1). An actor that dies mid-case (its process killed, its node lost) is replaced and the case
is given to the next idle actor; a case that loses its worker :data:`MAX_LOST_WORKERS` times is
recorded as failed. The output folder must be on a file system every node can write (the actors write
the case outputs; only the driver writes the database).
"""
from __future__ import annotations

import dataclasses
from collections import Counter, deque
from typing import Callable, Sequence

from ..errors import RuntimeUnavailableError
from .worker import CaseJob, CaseOutcome, CaseWorker, WorkerSettings

__all__ = ["run_on_ray", "MAX_LOST_WORKERS"]


class _ActorCaseWorker(CaseWorker):
    """A :class:`CaseWorker` in a Ray actor: a process of our own, so it also sets the allocator up."""

    def __init__(self, settings: WorkerSettings) -> None:
        from ..memory import tune_allocator

        tune_allocator()
        super().__init__(settings)

#: A case whose worker was lost this many times is recorded as failed (it may be what kills them).
MAX_LOST_WORKERS = 3


def _import_ray():
    try:
        import ray
    except ImportError as err:
        raise RuntimeUnavailableError("--engine ray needs Ray: pip install 'universalseg[ray]'.") from err
    return ray


def run_on_ray(settings: WorkerSettings, jobs: Sequence[CaseJob], on_start: Callable[[CaseJob, str], None],
               on_done: Callable[[CaseOutcome], None], on_stage: Callable[[str, str], None],
               address: str | None = None, workers: int | None = None,
               on_workers: Callable[[list[int]], None] | None = None) -> None:
    """Run ``jobs`` on Ray actors; ``on_workers`` gets the actors' process ids whenever the pool changes
    (used by tests to kill one)."""
    if not jobs:
        return
    ray = _import_ray()
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    resources = ray.cluster_resources()
    use_gpu = settings.device != "cpu" and resources.get("GPU", 0) >= 1
    if use_gpu:
        options, capacity = {"num_gpus": 1}, int(resources["GPU"])
    else:
        cpus = settings.threads or 1
        options, capacity = {"num_cpus": cpus}, max(1, int(resources.get("CPU", 1)) // cpus)
        settings = dataclasses.replace(settings, device="cpu")
    count = max(1, min(workers or capacity, len(jobs)))
    actor_class = ray.remote(max_restarts=0)(_ActorCaseWorker)

    def start_actor():
        return actor_class.options(**options).remote(settings)

    idle = [start_actor() for _ in range(count)]
    names: dict = {}

    def report_pool() -> None:
        if on_workers is not None:
            on_workers([ray.get(actor.pid.remote()) for actor in idle + [a for a, _ in running.values()]])

    running: dict = {}
    report_pool()
    pending = deque(jobs)
    lost: Counter = Counter()
    while pending or running:
        while idle and pending:
            actor, job = idle.pop(), pending.popleft()
            on_start(job, names.get(actor, "ray actor"))
            on_stage(job.case_id, "on a Ray worker")
            running[actor.run.remote(job)] = (actor, job)
        ready, _ = ray.wait(list(running), num_returns=1)
        actor, job = running.pop(ready[0])
        try:
            outcome = ray.get(ready[0])
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as err:
            lost[job.case_id] += 1
            ray.kill(actor, no_restart=True)
            idle.append(start_actor())
            report_pool()
            if lost[job.case_id] < MAX_LOST_WORKERS:
                pending.appendleft(dataclasses.replace(job, known=True))  # its folder may hold a partial set
                continue
            outcome = CaseOutcome(job.case_id, ok=False,
                                  error=f"the worker segmenting this case was lost {lost[job.case_id]} times ({err})")
        else:
            idle.append(actor)
        on_done(outcome)
    for actor in idle:
        ray.kill(actor)
