"""The Prometheus text of the whole server, whichever of its workers answers the scrape.

A scrape reads this worker's slots and every other worker's file (the
supervisor's workers each count into their own) and merges them: counters and
histograms summed over every worker that ever ran, including what a dead
worker counted, gauges over the live ones. Families are listed in the order of
their names.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

from evd.core.metrics.kinds import Family, Reading, catalogue
from evd.core.metrics.lifecycle import WORKER, Worker
from evd.core.metrics.slots import HOT, View, read, seal, worker_file

__all__ = ["render"]


def render() -> bytes:
    """The Prometheus text of the whole server: every worker's counts, merged.

    Seals the layout: every module that declares metrics must be imported before.
    """
    seal()
    WORKER.publish()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Scrape(WORKER))
    return generate_latest(registry)


def _views(own: Worker, size: int) -> list[View | None]:
    """Each worker's (counts, floats), None for one that never ran."""
    views: list[View | None] = []
    for k in range(max(own.workers, own.index + 1)):
        if k == own.index:
            floats = cast(list[float], HOT.floats[:size].tolist())
            views.append((HOT.counts[:size].tolist(), floats))
        elif own.run_dir is not None:
            views.append(read(worker_file(own.run_dir, k)))
        else:
            views.append(None)
    return views


class _Scrape(Collector):
    """The families of one scrape, from every worker's slots."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def collect(self) -> Iterator[Family]:
        layout = seal()
        host = self.worker.host
        views = _views(self.worker, layout.size)
        present = [v for v in views if v is not None]
        counts = [sum(col) for col in zip(*(c for c, _ in present), strict=True)]
        floats = [0.0] * layout.size
        for slot in layout.float_slots:
            floats[slot] = sum(f[slot] for _, f in present)
        up = [k < host.workers and host.up(k) for k in range(len(views))]
        reading = Reading(views=views, up=up, counts=counts, floats=floats)
        families = [family for metric in catalogue() for family in metric.families(reading)]
        yield from sorted(families, key=lambda family: family.name)
