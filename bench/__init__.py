"""Benchmarks of the unlearning engine; run as modules (`python -m bench.methods --help`)."""
