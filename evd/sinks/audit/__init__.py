"""The loss audit: what the edge accepted and rejected and the processors
dropped, beside what every sink delivered, per hour and event type.

evd.sinks.audit.stage is the audit stage (a delivery loop that counts and
writes nothing), evd.sinks.audit.ledger the file every stage's counts are
committed to with its offsets, evd.sinks.audit.report ``evd audit``'s table.
"""
