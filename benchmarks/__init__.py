"""Benchmarks of lightning-gf: `make bench` runs them and writes docs/benchmarks.md."""
