"""Benchmarks with same-run baselines: ``python -m bench`` (``make bench``). See bench/README.md."""
