"""longloom: distributed long-sequence training (Ulysses, TokenRing, LASP-2 SP; offload; lazy universal checkpoints)."""

__version__ = "0.1.0"
