"""Sequence parallelism: who talks to whom, and how."""

from longloom.parallel.dims import ParallelDims

__all__ = ["ParallelDims"]
