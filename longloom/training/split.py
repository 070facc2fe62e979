"""The dp x ulysses x ring split of a run and its checks against the model and data, part of the run plan.

`resolve_split` fills in `auto` (parallel.ring=auto: parallel/two_d.py's cost model) and checks the
product against the workers; `validate_layout` adds the divisibility rules (heads by ulysses, the
sequence by the SP chunks), each message naming the key to change. `resolve_model` gives an hf:
folder's shapes as model.*. Only the standard library and config at import time (the ring cost model
and the HF folder reader are imported when needed), so the driver's checks stay light.
"""

from __future__ import annotations

from longloom.config import ConfigError, LongloomConfig
from longloom.parallel import sharding


def resolve_model(cfg: LongloomConfig) -> LongloomConfig:
    """`cfg` with model.* shapes from the folder for `model.source: hf:<folder>` (unchanged for native)."""
    if not cfg.model.is_hf:
        return cfg
    from longloom.models.hf_loading import resolve_hf_model

    try:
        model, _ = resolve_hf_model(cfg.model)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return cfg.model_copy(update={"model": model})


def resolve_split(cfg: LongloomConfig, world_size: int | None = None) -> tuple[int, int, int]:
    """(dp, ulysses, ring) for `world_size` workers (default launch.workers): `auto` filled in, product checked."""
    workers = world_size if world_size is not None else cfg.launch.workers
    ulysses = cfg.parallel.ulysses
    ring = cfg.parallel.ring
    if ring == "auto":
        # The SP degree is what dp leaves of the workers; parallel/two_d.py's cost model splits it
        # into ulysses x ring (parallel.ulysses is then ignored).
        from longloom.parallel.two_d import choose_ring_degree

        fixed_dp = 1 if cfg.parallel.dp == "auto" else cfg.parallel.dp
        if workers % fixed_dp:
            raise ConfigError(f"launch.workers={workers} is not divisible by parallel.dp={fixed_dp}")
        sp = workers // fixed_dp
        m = cfg.model
        ring = choose_ring_degree(sp, m.heads, m.num_kv_heads, cfg.data.seq_len, head_dim=m.head_dim)
        ulysses = sp // ring
    dp = cfg.parallel.dp
    if dp == "auto":
        if workers % (ulysses * ring):
            raise ConfigError(
                f"launch.workers={workers} is not divisible by parallel.ulysses * parallel.ring = "
                f"{ulysses} * {ring}: change launch.workers or the SP degrees"
            )
        dp = workers // (ulysses * ring)
    if dp * ulysses * ring != workers:
        raise ConfigError(
            f"parallel.dp * parallel.ulysses * parallel.ring = {dp} * {ulysses} * {ring} = "
            f"{dp * ulysses * ring} must equal the number of workers ({workers}): set launch.workers="
            f"{dp * ulysses * ring} or change parallel.*"
        )
    return dp, ulysses, ring


def sp_layout(ring: int) -> str:
    """The layout the plan records: parallel/sharding.py's rule (ParallelDims applies the same one)."""
    return sharding.sequence_parallel_layout(ring)


def validate_layout(cfg: LongloomConfig, world_size: int | None = None) -> tuple[int, int, int]:
    """Checks the split against the model and data; returns (dp, ulysses, ring)."""
    cfg = resolve_model(cfg)
    return checked_split(cfg, world_size)


def checked_split(cfg: LongloomConfig, world_size: int | None) -> tuple[int, int, int]:
    """validate_layout for a config whose model.* is resolved already (resolve_model)."""
    dp, ulysses, ring = resolve_split(cfg, world_size)
    m = cfg.model
    if m.hidden % m.heads:
        raise ConfigError(f"model.hidden={m.hidden} is not divisible by model.heads={m.heads}")
    if m.heads % m.num_kv_heads:
        raise ConfigError(f"model.heads={m.heads} is not divisible by model.kv_heads={m.num_kv_heads}")
    if "S" in m.layer_pattern and m.heads % ulysses:
        raise ConfigError(
            f"model.heads={m.heads} is not divisible by parallel.ulysses={ulysses}: "
            f"choose parallel.ulysses among the divisors of {m.heads}"
        )
    if "S" in m.layer_pattern and m.num_kv_heads % ulysses and ulysses % m.num_kv_heads:
        raise ConfigError(
            f"model.kv_heads={m.num_kv_heads} and parallel.ulysses={ulysses}: one must divide the other"
        )
    sp = ulysses * ring
    # Zigzag cuts the sequence into 2 chunks per SP rank (parallel/sharding.py chunks_per_rank).
    chunks = sp * (2 if sp_layout(ring) == "zigzag" else 1)
    if cfg.data.seq_len % chunks:
        what = f"2 * parallel.ring * parallel.ulysses = {chunks}" if ring > 1 else f"the SP degree {sp}"
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} must be divisible by {what}; "
            f"e.g. data.seq_len={(cfg.data.seq_len // chunks + 1) * chunks}"
        )
    return dp, ulysses, ring
