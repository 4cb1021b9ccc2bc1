"""The files sink: the data lake (``type: files``).

evd.sinks.lake.sink is the sink and its config section (layout, writes, crash
bound), evd.sinks.lake.formats how one hour's rows become one file (NDJSON
gzip/zstd, Parquet), evd.sinks.lake.completeness when an hour is complete and
gets its ``_SUCCESS`` marker.
"""
