"""The round benchmark (``benchmarks/round_benchmark.py``), one job per module."""
