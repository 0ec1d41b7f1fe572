"""Tests of the benchmarks: --help, and turning samples into figures (no timing)."""
