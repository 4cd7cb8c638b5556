"""Benchmarks: scripts that measure and print (`python -m bench.<name>`); they assert nothing and are not tests."""
