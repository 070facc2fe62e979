"""The `longloom eval needle` command: plan the evaluation, run it on W workers, write the report.

Everything that can be wrong with the arguments (the model folder, the split, a length that the SP
degree does not divide) is found by `plan_needle_eval` in the calling process, before any worker starts,
and reported as one message with the fix. The workers (evaluation/workers.py) build the split, load the
model, evaluate every dp-th case on their SP group (evaluation/needle.py) and gather the results on rank
0, which writes the report (evaluation/report.py) beside the run. torch is imported by the workers only,
so that `longloom --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DEPTHS = "0,0.1,...,1"
DEFAULT_TRIALS = 5


@dataclass
class NeedlePlan:
    """Everything the workers need, decided before they start (and picklable for spawn)."""

    source: object  # models.ModelSource
    lengths: list[int]
    depths: list[float]
    trials: int
    seed: int
    split: tuple[int, int, int]  # dp, ulysses, ring
    out_dir: Path
    stem: str
    title: str


def plan_needle_eval(
    path: str | Path,
    lengths: str | None,
    depths: str = DEFAULT_DEPTHS,
    trials: int = DEFAULT_TRIALS,
    workers: int = 1,
    overrides: Sequence[str] = (),
    tokenizer: str = "auto",
    seed: int = 0,
    out_dir: str | Path | None = None,
) -> NeedlePlan:
    """Checks every argument against the model and the split; ValueError naming the value and the fix."""
    from longloom.config import ConfigError, LongloomConfig, config_from_dict, parse_overrides
    from longloom.data.tokenize import load_tokenizer
    from longloom.evaluation.models import check_hf_model, find_model_source
    from longloom.evaluation.needle import Haystacks, check_lengths, parse_depths, parse_lengths
    from longloom.training.split import resolve_split

    if trials < 1 or workers < 1:
        raise ValueError(f"--trials={trials} and --workers={workers} must be at least 1")
    tree = parse_overrides(list(overrides))
    if set(tree) - {"parallel"}:
        raise ConfigError(
            f"eval needle takes parallel.* overrides only (the split), got {', '.join(overrides)}: "
            "e.g. parallel.ulysses=2 parallel.ring=1"
        )
    source = find_model_source(path, tokenizer)
    cfg: LongloomConfig = config_from_dict(
        {**tree, "launch": {"workers": workers}}
        | ({"model": source.model_config.model_dump()} if source.model_config else {})
    )
    try:
        dp, ulysses, ring = resolve_split(cfg, workers)
    except ConfigError as error:  # the eval's worker count is --workers, not a config key
        raise ConfigError(str(error).replace("launch.workers", "--workers")) from None
    heads, kv_heads, vocab_size = _model_shape(source)
    if heads is not None and (heads % ulysses or (kv_heads % ulysses and ulysses % kv_heads)):
        raise ConfigError(
            f"parallel.ulysses={ulysses} does not divide the model's {heads} heads / {kv_heads} KV heads: "
            "choose parallel.ulysses among the divisors of the number of heads"
        )
    text_tokenizer = load_tokenizer(source.tokenizer)
    if vocab_size is not None and text_tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"tokenizer {text_tokenizer.name!r} has {text_tokenizer.vocab_size} tokens but the model only "
            f"{vocab_size}: pass the model's tokenizer with --tokenizer"
        )
    if lengths is None:
        if source.trained_seq_len is None:
            raise ValueError(
                f"{path}: pass --lengths (e.g. 4K,16K,64K); the model's training length is unknown"
            )
        length_list = [source.trained_seq_len]
    else:
        length_list = parse_lengths(lengths)
    if source.kind == "hf":
        check_hf_model(source, max(length_list))
    haystacks = Haystacks(text_tokenizer, seed)
    check_lengths(length_list, ulysses * ring, ring, haystacks.min_length(), haystacks.max_answer_tokens())
    if source.run_dir is not None:
        base = source.run_dir / "eval"
    else:
        base = source.path.parent / "eval" if source.kind == "native" else source.path / "eval"
    return NeedlePlan(
        source,
        length_list,
        parse_depths(depths),
        trials,
        seed,
        (dp, ulysses, ring),
        Path(out_dir) if out_dir is not None else base,
        f"needle-{source.name}",
        f"needle in a haystack: {source.path} ({workers} workers: dp {dp} x ulysses {ulysses} x ring {ring})",
    )


def _model_shape(source) -> tuple[int | None, int | None, int | None]:
    """(attention heads, KV heads, vocabulary size) of the model, read without loading it."""
    if source.model_config is not None:
        model = source.model_config
        softmax = "S" in model.layer_pattern  # linear-attention layers do not split heads
        return (model.heads if softmax else None), model.num_kv_heads, model.vocab_size
    hf_config = json.loads((source.path / "config.json").read_text())
    hf_config = hf_config.get("text_config", hf_config)
    heads = hf_config.get("num_attention_heads")
    return heads, hf_config.get("num_key_value_heads") or heads, hf_config.get("vocab_size")


def _needle_worker(plan: NeedlePlan) -> None:
    import torch.distributed as dist

    from longloom.evaluation.models import SequenceParallelPredictor
    from longloom.evaluation.needle import Haystacks, cases_for, evaluate_cases
    from longloom.evaluation.report import write_report
    from longloom.parallel.dims import ParallelDims
    from longloom.runtime.process import device_for_rank

    dp, ulysses, ring = plan.split
    dims = ParallelDims.build(dp=dp, ulysses=ulysses, ring=ring)
    predictor = SequenceParallelPredictor(plan.source, dims, device_for_rank(), max(plan.lengths))
    haystacks = Haystacks(predictor.tokenizer, plan.seed)
    cases = cases_for(plan.lengths, plan.depths, plan.trials)
    mine = evaluate_cases(predictor, cases[dims.dp_rank :: dims.dp], plan.depths, haystacks)
    gathered: list = [None] * dims.world_size
    dist.all_gather_object(gathered, mine)
    if dims.rank != 0:
        return
    # One SP group's copy of each dp group's results (every SP rank holds the same predictions).
    results = [r for rank in range(0, dims.world_size, dims.sp) for r in gathered[rank]]
    results.sort(key=lambda r: (r.length, plan.depths.index(r.depth), r.trial))
    paths = write_report(results, plan.lengths, plan.depths, plan.out_dir, plan.stem, plan.title)
    print(paths["md"].read_text(), end="")
    print("wrote " + ", ".join(str(p) for p in paths.values()))


def run_needle_eval(plan: NeedlePlan) -> Path:
    """Runs the plan on its workers; returns the CSV of the report."""
    from longloom.evaluation.workers import run_on_workers

    dp, ulysses, ring = plan.split
    run_on_workers(dp * ulysses * ring, _needle_worker, plan)
    return plan.out_dir / f"{plan.stem}.csv"


def add_needle_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", help="a run folder, a checkpoint (step-N or checkpoints/) or a Hugging Face model folder"
    )
    parser.add_argument(
        "overrides", nargs="*", help="the split as in training, e.g. parallel.ulysses=2 parallel.ring=2"
    )
    parser.add_argument(
        "--lengths", default=None, help="sequence lengths, e.g. 4K,16K,64K (default: the trained one)"
    )
    parser.add_argument(
        "--depths", default=DEFAULT_DEPTHS, help="needle depths in [0, 1], e.g. 0,0.5,1 or 0,0.1,...,1"
    )
    parser.add_argument("--trials", type=int, default=DEFAULT_TRIALS, help="passkeys per length and depth")
    parser.add_argument("--workers", type=int, default=1, help="processes (dp x ulysses x ring)")
    parser.add_argument(
        "--tokenizer", default="auto", help="auto: the model folder's own, else bytes; or a tokenizer folder"
    )
    parser.add_argument("--seed", type=int, default=0, help="draws the passkeys")
    parser.add_argument("--out", default=None, help="report folder (default: <run>/eval or <hf folder>/eval)")


def needle_from_args(args: argparse.Namespace) -> Path:
    plan = plan_needle_eval(
        args.model,
        args.lengths,
        args.depths,
        args.trials,
        args.workers,
        args.overrides,
        args.tokenizer,
        args.seed,
        args.out,
    )
    return run_needle_eval(plan)
