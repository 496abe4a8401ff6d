"""Offline models and data for the command line, tests and benchmarks (never imported by the core)."""
