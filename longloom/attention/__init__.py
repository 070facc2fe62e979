"""Single-device attention compute, used by parallel/: plain local attention (local.py), block attention
with log-sum-exp and its backends (blocks.py, triton_*.py, varlen.py), merges, linear attention, packed
documents. reference.py is the tests' fp64 ground truth; nothing under longloom/ imports it."""
