"""Stream processing of one raw-log partition: dedup, watermarks, sessions, charts.

The processor is ``evd.state.processor.PartitionProcessor``.
"""
