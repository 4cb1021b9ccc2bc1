"""pytest-benchmark micro-benchmarks of the hot paths (not run by CI)."""
