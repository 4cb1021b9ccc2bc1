"""Prometheus metrics of one server, whichever of its workers answers the scrape.

Every number a worker counts lives in a fixed slot of one array of 8-byte
values; under a supervisor that array is a file mapped shared into its worker,
its only writer, and a scrape on any worker reads every worker's file and sums
them, so ``/metrics`` reports the whole server, exact and current, including
what a worker counted before it died (its replacement maps the same file and
goes on counting).

``slots`` is the store (the array, its layout, the files), ``kinds`` the kinds
of metric (counters, gauges, histograms, the per-index vectors of the sinks),
``lifecycle`` this process as a worker (start_worker, stop_worker, publishing)
and ``exposition`` the Prometheus text (render). The metrics themselves are
declared by the stages that count them: ``evd.edge.metrics``,
``evd.core.log.embedded.metrics``, ``evd.state.metrics``, ``evd.sinks.metrics``;
a process imports them (as evd.worker does) before its first start_worker or
render seals the layout.

Why not prometheus-client's objects: ``Counter.inc`` and ``Histogram.observe``
take a lock and cost about 15% of the CPU of a single-event POST, and its
multiprocess mode does more per update and leaves a file per pid behind. Here
an update is one aligned 8-byte store into the array.
"""
