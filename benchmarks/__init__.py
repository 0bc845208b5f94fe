"""Benchmarks: the paper's comparison (compare.py) and speed and scale (perf.py)."""
