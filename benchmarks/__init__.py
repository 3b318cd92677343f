"""The parstream benchmark suite: ``python -m benchmarks``."""
