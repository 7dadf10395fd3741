"""Experiments and measurements for ldfa_hf; run each with ``python -m benchmarks.<name>``."""
