"""Benchmark sweep files and prompt sets, shipped with the package (``specdec bench --config``)."""
