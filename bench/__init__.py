"""Benchmark scripts (see README.md); a package so they can share setup code."""
