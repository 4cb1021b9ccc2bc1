"""Delivery: every sink is an independent consumer of output streams.

evd.sinks.base is the contract, evd.sinks.delivery the loop every sink runs
in, evd.sinks.rows the rows every sink writes, evd.sinks.registry the sink
types (``build_sink``), evd.sinks.audit the loss audit. One module per sink
type, holding its config section and its class: lake (the files sink, a
package: sink, formats, completeness), sqlite (the warehouse), http
(webhooks), kafka (a topic another team consumes), stdout.
"""
