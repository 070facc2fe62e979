"""The DeepSpeed ALST recipe as a user would wire it, one worker per GPU (launched by bench/e2e.py via torchrun).

transformers LlamaForCausalLM (sdpa attention) loaded from an HF folder under ZeRO-3 (HfDeepSpeedConfig:
each rank loads its partitions), DeepSpeed 0.19.8's ALST pieces from deepspeed.runtime.sequence_parallel
.ulysses_sp: UlyssesSPAttentionHF.register_with_transformers (Ulysses all-to-all around sdpa), TiledMLP
(ceil(local tokens / hidden) tiles), TiledFusedLogitsLoss (no [tokens, vocab] logits); every decoder layer
checkpointed with its input hidden states offloaded to pinned host memory (ArcticTraining's
activation_checkpoint_cpu_offload); ZeRO-3 with DeepSpeed CPU Adam (offload_optimizer: cpu); bf16.

The sample is bench/e2e_inputs.pattern_window: the same S + 1 tokens longloom trains on, every label valid,
sharded contiguously over the SP ranks by hand (what UlyssesSPDataLoaderAdapter does for one sample).
Prints `phase <name> <seconds since process start>` lines and one JSON line per step after `metrics `.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

STARTED = time.time()
PROCESS_START = float(os.environ.get("E2E_LAUNCH_TIME", STARTED))

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def phase(name: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"phase {name} {time.time() - PROCESS_START:.2f}", flush=True)


import torch
import torch.distributed as dist
import torch.nn.functional as F

from bench.e2e_inputs import pattern_window, tiles_for


class OffloadedCheckpoint(torch.autograd.Function):
    """Checkpoint of one decoder layer whose saved input lives on the host until backward recomputes it."""

    @staticmethod
    def forward(ctx, run, hidden):
        ctx.run, ctx.device = run, hidden.device
        host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=hidden.is_cuda)
        host.copy_(hidden, non_blocking=True)
        ctx.host = host
        with torch.no_grad():
            return run(hidden)

    @staticmethod
    def backward(ctx, grad):
        hidden = ctx.host.to(ctx.device, non_blocking=True).requires_grad_(True)
        with torch.enable_grad():
            out = ctx.run(hidden)
        torch.autograd.backward(out, grad)
        return None, hidden.grad


class OffloadedCheckpointLayer(torch.nn.Module):
    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, hidden_states, *args, **kwargs):
        def run(hidden):
            out = self.layer(hidden, *args, **kwargs)
            return out[0] if isinstance(out, tuple) else out

        return OffloadedCheckpoint.apply(run, hidden_states)


def tiled_mlp_forward(self, x):
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    # Every rank must run the same number of tiles (each tile gathers ZeRO-3 weights): agree on the max.
    tiles = torch.tensor(tiles_for(x.shape[-2], x.shape[-1]), device=x.device)
    dist.all_reduce(tiles, op=dist.ReduceOp.MAX)
    weights = [self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight]

    def mlp(module, chunk):
        return module.down_proj(module.act_fn(module.gate_proj(chunk)) * module.up_proj(chunk))

    return TiledMLP.apply(mlp, self, x, int(tiles.item()), weights)


def load_partitions(model: torch.nn.Module, folder: Path, rank: int) -> None:
    """Copies this rank's ZeRO-3 partition of every parameter from the folder's safetensors."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    params = dict(model.named_parameters())
    loaded = set()
    for file in files:
        with safe_open(str(folder / file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not iterable
                param = params[name]
                part = param.ds_tensor  # flat [ceil(numel / world)] slice, padded on the last rank
                start = rank * part.numel()
                stop = min(start + part.numel(), param.ds_numel)
                if stop > start:
                    stored = handle.get_slice(name)
                    columns = param.ds_numel // param.ds_shape[0]
                    first_row, last_row = start // columns, -(-stop // columns)
                    rows = stored[first_row:last_row].reshape(-1)
                    offset = start - first_row * columns
                    part.data[: stop - start].copy_(rows[offset : offset + stop - start])
                loaded.add(name)
    if missing := set(params) - loaded:
        raise ValueError(f"{folder} lacks weights for {sorted(missing)[:5]} ({len(missing)} in all)")


def lr_factor(steps: int, warmup: int = 2, floor: float = 0.1):
    """longloom's schedule (train.warmup_steps=2, min_lr_ratio=0.1): linear warmup, cosine to 0.1 x lr."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def ds_config(args) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": args.lr, "betas": [0.9, 0.95], "weight_decay": 0.0}},
        "zero_optimization": {
            "stage": 3,
            "offload_optimizer": {"device": "cpu", "pin_memory": True},
            "overlap_comm": True,
            "contiguous_gradients": True,
            "stage3_gather_16bit_weights_on_model_save": False,
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import deepspeed
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss, UlyssesSPAttentionHF
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.llama import modeling_llama

    phase("imports")
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    phase("distributed_init")

    config = ds_config(args)
    # Ulysses over all ranks (dp = 1), as longloom's parallel.ulysses=N; returns None on one rank.
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=args.hf_dir,
        core_attn_implementation="sdpa",
        sequence_parallel_size=world,
        micro_batch_size=1,
        seq_length=args.seq_len,
        seq_length_is_variable=False,
    )
    modeling_llama.LlamaMLP.forward = tiled_mlp_forward
    hf_config = AutoConfig.from_pretrained(args.hf_dir)
    # zero.Init partitions each parameter as it is made; every rank then reads only its own slice of the
    # safetensors (transformers' own ZeRO-3 path, HfDeepSpeedConfig, needs accelerate, which the GPU
    # machine lacks; it would also read every tensor on rank 0 and broadcast it).
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa", dtype=torch.bfloat16)
    load_partitions(model, Path(args.hf_dir), rank)
    model.config.use_cache = False
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList(OffloadedCheckpointLayer(layer) for layer in layers)
    phase("model_init")

    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=model.parameters(),
        config=config,
        mpu=mpu,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(args.steps)),
    )
    phase("engine_init")

    window = torch.from_numpy(pattern_window(args.seq_len, hf_config.vocab_size, args.seed))
    local = args.seq_len // world
    span = slice(rank * local, (rank + 1) * local)
    input_ids = window[:-1][span].unsqueeze(0).to(device)
    labels = window[1:][span].unsqueeze(0).to(device)
    position_ids = torch.arange(args.seq_len)[span].unsqueeze(0).to(device)
    lm_head = engine.module.lm_head
    # Logit tiles of ~1 GiB of fp32 logits, as ArcticTraining sizes them.
    loss_tiles = max(1, math.ceil(local * hf_config.vocab_size * 4 / 2**30))

    # ZeRO averages gradients over the SP ranks, so each rank's loss is its token sum x world / S: the
    # average is then the gradient of the global mean. The scale must be inside the tiled function, which
    # runs the lm_head's backward during its forward (an outer factor would not reach lm_head.weight).
    scale = world / args.seq_len

    def scaled_loss_sum(head, hidden, target):
        logits = head(hidden).float().view(-1, hf_config.vocab_size)
        return F.cross_entropy(logits, target.view(-1), reduction="sum") * scale

    for step in range(1, args.steps + 1):
        if cuda:
            torch.cuda.synchronize()
        began = time.perf_counter()
        hidden = engine.module.model(input_ids=input_ids, position_ids=position_ids).last_hidden_state
        local_loss = TiledFusedLogitsLoss.apply(
            scaled_loss_sum, lm_head, hidden, labels, None, loss_tiles, [lm_head.weight], "sum"
        )
        engine.backward(local_loss)
        engine.step()
        total = local_loss.detach().clone()
        dist.all_reduce(total)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - began
        if step == 1:
            phase("first_step")
        record = {"step": step, "loss": total.item() / world, "step_time_s": elapsed}
        record["grad_norm"] = float(engine.get_global_grad_norm() or 0.0)
        record["lr"] = engine.get_lr()[0]
        record["tokens_per_s"] = args.seq_len / elapsed
        if cuda:
            record["memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
            record["reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30
            stats = getattr(torch.cuda, "host_memory_stats", dict)()
            pinned = stats.get("allocated_bytes.all.peak") or stats.get("reserved_bytes.all.peak")
            if pinned is not None:
                record["pinned_host_gb"] = pinned / 2**30
        if rank == 0:
            print("metrics " + json.dumps(record), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
