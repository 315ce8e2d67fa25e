"""Benchmarks: each prints a table of ratios against a baseline timed in the same process.

Run them from the repository root as modules, e.g. ``python -m bench.step --cutlass``; shared
timing and profiling helpers are in :mod:`bench.common`. The figures they produced, with device,
date and command, are in BENCHMARKS.md; bench/run_h200.sh is the GPU session behind them.
"""
