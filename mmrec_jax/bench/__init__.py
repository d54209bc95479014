"""Benchmarks: `python -m mmrec_jax.bench.NAME`."""
