"""longloom: distributed long-sequence training (Ulysses, TokenRing, LASP-2 SP; offload; lazy universal checkpoints)."""

__version__ = "0.1.0"

# Before anything imports DeepSpeed, in every process that imports longloom (driver, Ray and torchrun
# workers): DeepSpeed's ops are built once per environment into a folder of its own (runtime/extensions.py).
from longloom.runtime.extensions import use_stable_extensions_dir

use_stable_extensions_dir()
