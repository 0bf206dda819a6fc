"""Benchmarks, evaluation and the testbed."""
