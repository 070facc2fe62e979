"""Needle eval of a native longloom run: the issue's self-check (the demo's model, trained by configs/tiny.yaml
on synthetic passkey, retrieves above chance at its trained length) and the report under SP splits equal to
one process."""

import json
import math

import pytest
import torch

from longloom.config import load_config
from longloom.data.tokenize import ByteTokenizer
from longloom.evaluation.models import find_model_source, load_native_weights
from longloom.evaluation.needle import Haystacks, cases_for
from longloom.evaluation.needle_run import _needle_worker, plan_needle_eval
from longloom.evaluation.report import read_csv
from longloom.models.llama import LlamaModel
from longloom.training.trainer import run_training

# configs/tiny.yaml exactly as the demo trains it (2 workers, Ulysses SP), here on the suite's gloo pool
# instead of a Ray cluster: the same run_training, the same losses, ~15 s of CPU.
TINY_STEPS = load_config("configs/tiny.yaml").train.steps
TINY_LENGTH = load_config("configs/tiny.yaml").data.seq_len
STEM = f"needle-step-{TINY_STEPS}"
TRIALS_PER_DEPTH = 20
DEPTHS = "0,0.25,...,1"
# Per answer digit: the first is 1-9, the others 0-9, each independent of the teacher-forced digits before
# it, so a model that does not retrieve gets each right with probability at most 1/9.
DIGIT_CHANCE = 1 / 9
# Of 5 depths x 20 trials x 5 digits = 500, at least 90 right (0.18): a model that does not retrieve gets
# there with probability P(Binomial(500, 1/9) >= 90) = 3.3e-6. Seen (seed 0, fp32 CPU): 131 (0.262).
MIN_DIGITS_RIGHT = 90


def _binomial_tail(n: int, k: int, p: float) -> float:
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


def _train_worker(overrides: list[str]) -> list[float]:
    return run_training(load_config("configs/tiny.yaml", overrides))["losses"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from tests.conftest import run_distributed

    run_dir = tmp_path_factory.mktemp("tiny-passkey")
    losses = run_distributed(2, _train_worker, [f"train.output_dir={run_dir}"])[0]
    assert len(losses) == TINY_STEPS and losses[-1] < losses[0]
    return run_dir


def test_tiny_demo_model_retrieves_above_chance_at_its_trained_length(distributed, trained_run):
    plan = plan_needle_eval(trained_run, None, DEPTHS, trials=TRIALS_PER_DEPTH)
    assert plan.lengths == [TINY_LENGTH] and plan.out_dir == trained_run / "eval" and plan.stem == STEM
    distributed(1, _needle_worker, plan)
    trials = json.loads((plan.out_dir / f"{STEM}.json").read_text())["trials"]
    digits = sum(len(t["answer"]) for t in trials)
    right = sum(a == p for t in trials for a, p in zip(t["answer"], t["predicted"]))
    rows = read_csv(plan.out_dir / f"{STEM}.csv")
    assert digits == 5 * 5 * TRIALS_PER_DEPTH and sum(int(row["trials"]) for row in rows) == len(trials)
    assert sum(float(row["answer_token_accuracy"]) for row in rows) / len(rows) == pytest.approx(
        right / digits
    )
    print(
        f"self-check: {right} of {digits} answer digits right ({right / digits:.3f}; chance {DIGIT_CHANCE:.3f})"
    )
    assert _binomial_tail(digits, MIN_DIGITS_RIGHT, DIGIT_CHANCE) < 1e-5
    assert right >= MIN_DIGITS_RIGHT, f"{right} of {digits} answer digits right; chance is {DIGIT_CHANCE:.3f}"
    assert (plan.out_dir / f"{STEM}.png").is_file() and (plan.out_dir / f"{STEM}.md").is_file()


def _reference_predictions(plan):
    source = find_model_source(plan.source.path)
    model = LlamaModel(source.model_config).eval()
    load_native_weights(source, model)
    haystacks = Haystacks(ByteTokenizer(), plan.seed)
    predictions = []
    for case in cases_for(plan.lengths, plan.depths, plan.trials):
        window, answer, _ = haystacks.build(case, plan.depths.index(case.depth))
        tokens = torch.from_numpy(window[:-1]).unsqueeze(0)
        with torch.no_grad():
            logits = model(tokens, torch.arange(tokens.size(1)).unsqueeze(0))
        predictions.append(logits.argmax(-1)[0, -len(answer) :].tolist())
    return predictions


@pytest.mark.parametrize("overrides", [["parallel.ulysses=2"], ["parallel.ring=2"]])
def test_native_report_under_sp_matches_one_process(distributed, trained_run, tmp_path, overrides):
    checkpoint = trained_run / "checkpoints" / f"step-{TINY_STEPS}"
    plan = plan_needle_eval(
        checkpoint, "64,128", "0,0.5,1", trials=3, workers=2, overrides=overrides, out_dir=tmp_path
    )
    distributed(2, _needle_worker, plan)
    trials = json.loads((tmp_path / f"{STEM}.json").read_text())["trials"]
    assert [t["predicted"] for t in trials] == _reference_predictions(plan)
    rows = read_csv(tmp_path / f"{STEM}.csv")
    for row in rows:
        cell = [t for t in trials if t["length"] == int(row["length"]) and t["depth"] == float(row["depth"])]
        assert int(row["retrieved"]) == sum(t["answer"] == t["predicted"] for t in cell)
