"""`longloom ckpt convert`: between longloom's checkpoints, the universal layout, DeepSpeed's formats and
Hugging Face model folders.

Its own floor above models/ (docs/architecture.md, "Floors"): the Hugging Face conversions build the
folder's architecture (on the meta device) to know its parameter names and shapes, so they import
models/, while models/ reads safetensors ranges through checkpointing/. The formats themselves
(tensor files, the universal layout, DeepSpeed's files) stay in checkpointing/.
"""
