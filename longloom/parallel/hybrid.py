"""Kept import path: `from longloom.parallel.hybrid import sequence_parallel_attention` is a public contract
(shared/DESIGN.md), so this module stays as a re-export.

The code lives in parallel/two_d.py (2D sequence parallelism: Ulysses inside a group x TokenRing across
groups). "Hybrid" elsewhere in longloom means LASP-2H models (linear + softmax layers, parallel/lasp2.py).
New code imports from `longloom.parallel.two_d`.
"""

from longloom.parallel.two_d import choose_ring_degree, ring_layer_cost, sequence_parallel_attention

__all__ = ["choose_ring_degree", "ring_layer_cost", "sequence_parallel_attention"]
