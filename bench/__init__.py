"""Benchmarks of the gateway against the seed service it replaces.

Run from the repository root, e.g. ``python -m bench.http --quick``. Nothing
here is a test: the figures are printed, and the machine decides them.
"""
