"""Benchmarks and estimators: the bench.py suites, the --dry-run estimator, the baseline drafters."""
