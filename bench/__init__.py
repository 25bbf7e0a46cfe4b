"""Benchmarks: each prints ratios or distributions measured in one run, never pass/fail."""
