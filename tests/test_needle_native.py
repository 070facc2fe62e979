"""Needle eval of a native longloom run: the issue's self-check (a tiny model trained on synthetic passkey
retrieves above chance at its trained length) and the report under SP splits equal to one process."""

import json

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

# configs/tiny.yaml's model and task at a short length, so that retrieval is learnt in ~100 CPU steps.
TRAINING = [
    "data.seq_len=64",
    "train.micro_batch_size=16",
    "train.steps=110",
    "train.warmup_steps=20",
    "train.lr=3e-3",
    "train.dtype=fp32",
    "train.log_every=10",
    "checkpoint.interval=110",
    "launch.workers=1",
    "parallel.ulysses=1",
]
DIGIT_CHANCE = 0.1


def _train_worker(overrides: list[str]) -> list[float]:
    return run_training(load_config("configs/tiny.yaml", overrides))["losses"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from tests.conftest import run_distributed

    run_dir = tmp_path_factory.mktemp("tiny-passkey")
    losses = run_distributed(1, _train_worker, [*TRAINING, f"train.output_dir={run_dir}"])[0]
    assert losses[-1] < losses[0]
    return run_dir


def test_tiny_passkey_model_retrieves_above_chance_at_its_trained_length(distributed, trained_run):
    plan = plan_needle_eval(trained_run, None, "0,0.25,...,1", trials=8)
    assert plan.lengths == [64] and plan.out_dir == trained_run / "eval" and plan.stem == "needle-step-110"
    distributed(1, _needle_worker, plan)
    rows = read_csv(plan.out_dir / "needle-step-110.csv")
    token_accuracy = sum(float(row["answer_token_accuracy"]) for row in rows) / len(rows)
    retrieved = sum(int(row["retrieved"]) for row in rows)
    # Chance: 1 digit in 10 (a whole passkey 1 in 90,000). Seen at 110 steps: 0.54 of the answer digits
    # right and 1 of 40 passkeys whole; the whole-passkey count is too small to assert across platforms.
    print(f"self-check: answer-token accuracy {token_accuracy:.2f}, retrieved {retrieved} of {8 * len(rows)}")
    assert token_accuracy > 3 * DIGIT_CHANCE
    assert (plan.out_dir / "needle-step-110.png").is_file() and (
        plan.out_dir / "needle-step-110.md"
    ).is_file()


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
    checkpoint = trained_run / "checkpoints" / "step-110"
    plan = plan_needle_eval(
        checkpoint, "64,128", "0,0.5,1", trials=3, workers=2, overrides=overrides, out_dir=tmp_path
    )
    distributed(2, _needle_worker, plan)
    trials = json.loads((tmp_path / "needle-step-110.json").read_text())["trials"]
    assert [t["predicted"] for t in trials] == _reference_predictions(plan)
    rows = read_csv(tmp_path / "needle-step-110.csv")
    for row in rows:
        cell = [t for t in trials if t["length"] == int(row["length"]) and t["depth"] == float(row["depth"])]
        assert int(row["retrieved"]) == sum(t["answer"] == t["predicted"] for t in cell)
