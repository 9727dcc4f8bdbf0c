"""Benchmarks: each prints one JSON object; run them through `recs bench ...`."""
