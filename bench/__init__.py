"""Benchmark suites (pytest-benchmark); ``make bench`` runs the CPU set."""
