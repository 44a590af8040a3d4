"""Benchmarks: every backend timed on the same inputs, and the reports."""
