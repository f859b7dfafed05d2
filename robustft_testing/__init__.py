"""Builders of test data (tiny binarized datasets) for the tests, scripts/fp16_check.py and the benchmarks.

Not a runtime package: no fairseq user dir imports it, and it registers nothing.
"""
