"""Stead's benchmarks: each claim measured against bare Temporal in the same run.

`python -m bench` (or `make bench`) runs them all; see `bench/__main__.py` for how to pick some
and for `--quick` smoke sizes. Results land in `bench/results/`.
"""
