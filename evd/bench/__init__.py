"""``evd bench``: the load harness (generator processes, HTTP client, JSON and HTML report).

``data/seed-event.json`` is the seed event as package data, for load scripts that
build their batches from it.
"""
