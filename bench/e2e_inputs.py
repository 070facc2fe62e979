"""What the end-to-end benchmark feeds every system: model shapes, a token pattern, a data folder, an HF folder.

Every system trains on the same tokens with every label valid: a block of random tokens repeated through
one long document (no EOS), so the loss is the mean over all S tokens of each sample and falls as the
model learns to copy the block (induction), unlike the passkey task whose 5 labelled tokens say little.
The block length divides data.seq_len, so every training window holds exactly the same S + 1 tokens:
sampling order (longloom's loader shuffles) cannot make two systems see different data.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass(frozen=True)
class Shape:
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    rope_theta: float

    def native_overrides(self) -> list[str]:
        """longloom config overrides that build this shape natively."""
        return [
            f"model.vocab_size={self.vocab_size}",
            f"model.hidden={self.hidden}",
            f"model.layers={self.layers}",
            f"model.heads={self.heads}",
            f"model.kv_heads={self.kv_heads}",
            f"model.intermediate={self.intermediate}",
            f"model.rope_theta={self.rope_theta}",
        ]


PRESETS = {
    # Llama-3-8B: 32 layers, 4096 hidden, 32 query / 8 KV heads, 14336 SwiGLU, 128256 vocabulary.
    "8b": Shape(128256, 4096, 32, 32, 8, 14336, 500000.0),
    # CPU smoke test of the harness: the same structure (GQA, untied head), seconds per step.
    "tiny": Shape(512, 64, 2, 4, 2, 128, 500000.0),
}


PATTERN_IDS = 1024


def pattern_period(seq_len: int) -> int:
    """Length of the repeated random block: the largest divisor of seq_len up to min(4096, seq_len // 4)."""
    limit = max(1, min(4096, seq_len // 4))
    return max(d for d in range(1, limit + 1) if seq_len % d == 0)


def pattern_window(seq_len: int, vocab_size: int, seed: int = 0) -> np.ndarray:
    """The S + 1 tokens of every sample (int64): a random block repeated.

    The block's ids come from the first min(vocab - 1, 1024) ids, so the loss falls within a few steps
    (from ~ln(vocab) towards ln(1024) as the head learns which ids occur, then lower as the model learns
    to copy the block). vocab_size - 1 is the EOS of the data folder and never occurs: one document.
    """
    period = pattern_period(seq_len)
    distinct = min(vocab_size - 1, PATTERN_IDS)
    block = np.random.default_rng(seed).integers(0, distinct, size=period, dtype=np.int64)
    return np.resize(block, seq_len + 1)


def write_token_folder(folder: Path, seq_len: int, vocab_size: int, samples: int, seed: int = 0) -> Path:
    """A `longloom data prepare`-format folder holding `samples` windows of the pattern (one document)."""
    from longloom.data.arrow import ShardWriter, write_index

    index = folder / "index.json"
    if index.exists():
        meta = json.loads(index.read_text())
        if meta.get("bench_pattern") == [seq_len, vocab_size, samples, seed]:
            return folder
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("shard-*.arrow"):
        old.unlink()
    window = pattern_window(seq_len, vocab_size, seed)
    # Windows tile the stream with a one-token overlap; the block divides seq_len, so one long repetition
    # of the block is every window at once.
    tokens = np.resize(window[:-1], samples * seq_len + 1).astype(np.int32)
    writer = ShardWriter(folder)
    writer.add(tokens)
    shards = writer.close()
    write_index(
        folder,
        {
            "source": "bench/e2e_inputs.py pattern",
            "documents": 1,
            "tokens": len(tokens),
            "tokenizer": "none (random ids)",
            "vocab_size": vocab_size,
            "eos_id": vocab_size - 1,
            "label_mask": False,
            "bench_pattern": [seq_len, vocab_size, samples, seed],
            "shards": shards,
        },
    )
    return folder


def _llama_config(shape: Shape, max_positions: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta},
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        use_cache=False,
        bos_token_id=None,
        eos_token_id=shape.vocab_size - 1,
        pad_token_id=None,
    )


def write_hf_folder(folder: Path, shape: Shape, max_positions: int, seed: int = 0) -> tuple[Path, float]:
    """A transformers LlamaForCausalLM folder with random bf16 weights; (folder, seconds spent).

    Built without materialising the model: the parameter names and shapes come from a model on the meta
    device, and each tensor is drawn (normal, std 0.02 as transformers' init; norms = 1) and written to
    safetensors shards of <= 4 GiB. Reused when the folder already holds this shape.
    """
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    stamp = folder / "bench_shape.json"
    wanted = json.dumps({**asdict(shape), "max_positions": max_positions, "seed": seed})
    if stamp.exists() and stamp.read_text() == wanted:
        return folder, 0.0
    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    for old in [*folder.glob("*.safetensors"), folder / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)
    config = _llama_config(shape, max_positions)
    config.dtype = "bfloat16"
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        names_shapes = [(name, p.shape) for name, p in LlamaForCausalLM(config).named_parameters()]
    # Drawn on a GPU when there is one (seconds for 8B parameters instead of minutes on the host).
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator(device).manual_seed(seed)
    limit, shards, current, current_bytes = 4 << 30, [], {}, 0
    for name, size in names_shapes:
        if name.endswith("norm.weight"):
            tensor = torch.ones(size, dtype=torch.bfloat16)
        else:
            tensor = torch.empty(size, dtype=torch.float32, device=device).normal_(
                0.0, 0.02, generator=generator
            )
            tensor = tensor.to(torch.bfloat16).cpu()
        nbytes = tensor.numel() * 2
        if current and current_bytes + nbytes > limit:
            shards.append(current)
            current, current_bytes = {}, 0
        current[name] = tensor
        current_bytes += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        for name, tensor in shard.items():
            weight_map[name] = file
            total += tensor.numel() * 2
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    config.save_pretrained(folder)
    stamp.write_text(wanted)
    return folder, time.perf_counter() - started


def tiles_for(local_tokens: int, hidden: int) -> int:
    """ALST's TiledMLP shard count: ceil(local tokens / hidden)."""
    return max(1, math.ceil(local_tokens / hidden))
