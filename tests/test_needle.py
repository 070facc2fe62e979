"""Needle in a haystack: the cases are training's passkey windows, the report of any split equals a
single-process computation, and bad arguments are refused before any worker starts."""

import json

import matplotlib.image
import numpy as np
import pytest
import torch

from longloom.cli import main
from longloom.data.synthetic import PASSKEY_FILLER, passkey_window
from longloom.data.tokenize import ByteTokenizer
from longloom.evaluation.needle import Haystacks, NeedleCase, cases_for, parse_depths, parse_lengths
from longloom.evaluation.needle_run import _needle_worker, plan_needle_eval
from longloom.evaluation.report import read_csv

transformers = pytest.importorskip("transformers")

LENGTHS = "64,128"
DEPTHS = "0,0.5,1"


def test_lengths_and_depths_parse():
    assert parse_lengths("4K,16K, 1M,100") == [4096, 16384, 1 << 20, 100]
    assert parse_depths("0,0.25,...,1") == [0, 0.25, 0.5, 0.75, 1]
    assert parse_depths("0,0.5") == [0, 0.5]
    for bad in ("4Q", "", "-3"):
        with pytest.raises(ValueError, match="--lengths"):
            parse_lengths(bad)
    for bad in ("0,2", "x", "0,...,1"):
        with pytest.raises(ValueError, match="--depths"):
            parse_depths(bad)


class _ScriptedRng:
    """Stands in for numpy's generator in passkey_window: returns the given draws in order."""

    def __init__(self, *draws):
        self.draws = list(draws)

    def integers(self, *args):
        return self.draws.pop(0)


@pytest.mark.parametrize("length", [64, 256])
def test_byte_cases_are_the_training_windows_of_synthetic_passkey(length):
    haystacks = Haystacks(ByteTokenizer(), seed=0)
    for depth_index, depth in enumerate([0, 0.3, 0.5, 1]):
        window, answer, needle_at = haystacks.build(NeedleCase(length, depth, 0), depth_index)
        passkey = int(ByteTokenizer().decode(answer))
        filler_len = length + 1 - haystacks.overhead(len(answer))
        # training draws the passkey, then the index of the boundary among [0, sentence ends, end]
        filler = np.resize(PASSKEY_FILLER, filler_len)
        ends = [i + 2 for i in range(filler_len - 1) if filler[i] == ord(".") and filler[i + 1] == ord(" ")]
        boundaries = [0, *ends, filler_len]
        cut = needle_at - 1
        reference, answer_mask = passkey_window(length, _ScriptedRng(passkey, boundaries.index(cut)))
        assert window.tolist() == reference.tolist() and len(window) == length + 1
        assert answer_mask[-len(answer) :].all() and not answer_mask[: -len(answer)].any()
        # the needle sits at the sentence boundary nearest the depth
        assert abs(cut - depth * filler_len) == min(abs(b - depth * filler_len) for b in boundaries)


def _hf_folder(root, vocab_size=300):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(root)
    return model.eval()


def _reference_predictions(model, plan, tokenizer=None):
    """The needle answers of every case on one process, whole sequences, no SP."""
    haystacks = Haystacks(tokenizer or ByteTokenizer(), plan.seed)
    predictions = []
    for case in cases_for(plan.lengths, plan.depths, plan.trials):
        window, answer, _ = haystacks.build(case, plan.depths.index(case.depth))
        with torch.no_grad():
            logits = model(input_ids=torch.from_numpy(window[:-1]).unsqueeze(0)).logits
        predictions.append((answer, logits.argmax(-1)[0, -len(answer) :].tolist()))
    return predictions


def _check_report(plan, reference):
    trials = json.loads((plan.out_dir / f"{plan.stem}.json").read_text())["trials"]
    assert [(t["answer"], t["predicted"]) for t in trials] == reference
    rows = read_csv(plan.out_dir / f"{plan.stem}.csv")
    assert len(rows) == len(plan.lengths) * len(plan.depths)
    for row in rows:
        cell = [
            (answer, predicted)
            for (answer, predicted), t in zip(reference, trials)
            if t["length"] == int(row["length"]) and t["depth"] == float(row["depth"])
        ]
        retrieved = sum(answer == predicted for answer, predicted in cell)
        right = sum(a == p for answer, predicted in cell for a, p in zip(answer, predicted))
        assert int(row["trials"]) == len(cell) == plan.trials and int(row["retrieved"]) == retrieved
        assert float(row["answer_token_accuracy"]) == pytest.approx(right / (5 * len(cell)), abs=1e-6)
    table = (plan.out_dir / f"{plan.stem}.md").read_text()
    assert "| 64 |" in table and "| 128 |" in table and table.count("| length | 0 | 0.5 | 1 | mean |") == 2
    digits_right = sum(a == p for answer, predicted in reference for a, p in zip(answer, predicted))
    assert f"{digits_right} of {5 * len(reference)} digits" in table  # the answer-digit table's total
    image = matplotlib.image.imread(plan.out_dir / f"{plan.stem}.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


@pytest.mark.parametrize(
    "world, overrides",
    [(2, ["parallel.ulysses=2"]), (2, ["parallel.ring=2"]), (4, ["parallel.dp=2", "parallel.ring=2"])],
)
def test_hf_model_report_under_sp_matches_one_process(distributed, tmp_path, world, overrides):
    model = _hf_folder(tmp_path / "hf")
    plan = plan_needle_eval(
        tmp_path / "hf", LENGTHS, DEPTHS, trials=2, workers=world, overrides=overrides, tokenizer="bytes"
    )
    assert plan.out_dir == tmp_path / "hf" / "eval"
    distributed(world, _needle_worker, plan)
    _check_report(plan, _reference_predictions(model, plan))


def test_hf_folder_with_its_own_tokenizer(distributed, tmp_path):
    from longloom.data.tokenize import load_tokenizer
    from tests.data.test_chat import PLAIN_TEMPLATE, _save_tokenizer

    tokenizer = _save_tokenizer(tmp_path / "hf", PLAIN_TEMPLATE)
    model = _hf_folder(tmp_path / "hf", vocab_size=len(tokenizer))
    plan = plan_needle_eval(
        tmp_path / "hf", LENGTHS, DEPTHS, trials=2, workers=2, overrides=["parallel.ring=2"]
    )
    assert plan.source.tokenizer == str(tmp_path / "hf")  # auto: the folder's own
    distributed(2, _needle_worker, plan)
    own = load_tokenizer(plan.source.tokenizer)
    reference = _reference_predictions(model, plan, own)
    trials = json.loads((plan.out_dir / f"{plan.stem}.json").read_text())["trials"]
    assert [(t["answer"], t["predicted"]) for t in trials] == reference
    haystacks = Haystacks(own, plan.seed)
    window, answer, needle_at = haystacks.build(cases_for([64], [0.5], 1)[0], 0)
    text = own.decode(window)
    assert len(window) == 65 and text.endswith("key: " + own.decode(answer)) and text.count("key: ") == 2
    assert own.decode(window[needle_at:]).startswith(f"key: {own.decode(answer)}. ")


def test_cli_runs_in_process_and_on_spawned_workers(tmp_path, capsys):
    model = _hf_folder(tmp_path / "hf")
    common = [
        "eval",
        "needle",
        str(tmp_path / "hf"),
        "--lengths",
        LENGTHS,
        "--depths",
        DEPTHS,
        "--trials",
        "2",
    ]
    assert main([*common, "--tokenizer", "bytes", "--out", str(tmp_path / "one")]) == 0
    assert "Retrieval accuracy (%)" in capsys.readouterr().out
    assert (
        main(
            [
                *common,
                "--workers",
                "2",
                "--tokenizer",
                "bytes",
                "parallel.ulysses=2",
                "--out",
                str(tmp_path / "two"),
            ]
        )
        == 0
    )
    plan = plan_needle_eval(
        tmp_path / "hf", LENGTHS, DEPTHS, trials=2, tokenizer="bytes", out_dir=tmp_path / "one"
    )
    reference = _reference_predictions(model, plan)
    _check_report(plan, reference)
    two = plan_needle_eval(
        tmp_path / "hf", LENGTHS, DEPTHS, trials=2, tokenizer="bytes", out_dir=tmp_path / "two"
    )
    _check_report(two, reference)


def test_bad_arguments_are_refused_before_any_worker(tmp_path, capsys):
    _hf_folder(tmp_path / "hf")
    with pytest.raises(
        ValueError,
        match=r"eval length 130 is not divisible by 2 x parallel.ring x parallel.ulysses = 4.*e.g. 132",
    ):
        plan_needle_eval(
            tmp_path / "hf", "64,130", workers=2, overrides=["parallel.ring=2"], tokenizer="bytes"
        )
    with pytest.raises(ValueError, match=r"eval length 66 is not divisible by the SP degree 4"):
        plan_needle_eval(
            tmp_path / "hf", "66", workers=4, overrides=["parallel.ulysses=4"], tokenizer="bytes"
        )
    with pytest.raises(ValueError, match=r"parallel.ulysses=3 does not divide the model's 4 heads"):
        plan_needle_eval(
            tmp_path / "hf", "66", workers=3, overrides=["parallel.ulysses=3"], tokenizer="bytes"
        )
    with pytest.raises(ValueError, match=r"eval length 32 cut into 8 chunks leaves 4 tokens a chunk.*>= 40"):
        plan_needle_eval(
            tmp_path / "hf", "32", workers=4, overrides=["parallel.ulysses=2", "parallel.ring=2"]
        )
    with pytest.raises(ValueError, match=r"--workers=4 is not divisible"):
        plan_needle_eval(
            tmp_path / "hf", "64", workers=4, overrides=["parallel.ulysses=3"], tokenizer="bytes"
        )
    (tmp_path / "small").mkdir()
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "small" / name).write_bytes((tmp_path / "hf" / name).read_bytes())
    small = json.loads((tmp_path / "hf" / "config.json").read_text()) | {"vocab_size": 200}
    (tmp_path / "small" / "config.json").write_text(json.dumps(small))
    with pytest.raises(ValueError, match=r"tokenizer 'bytes' has 259 tokens but the model only 200"):
        plan_needle_eval(tmp_path / "small", "64")
    wrong = json.loads((tmp_path / "hf" / "config.json").read_text()) | {"intermediate_size": 48}
    (tmp_path / "small" / "config.json").write_text(json.dumps(wrong))
    with pytest.raises(
        ValueError, match="another shape in the weights than config.json"
    ):  # before any worker
        plan_needle_eval(tmp_path / "small", "64", tokenizer="bytes")
    with pytest.raises(ValueError, match="parallel.\\* overrides only"):
        plan_needle_eval(tmp_path / "hf", "64", overrides=["train.steps=3"], tokenizer="bytes")
    with pytest.raises(ValueError, match="cannot tell what"):
        plan_needle_eval(tmp_path, "64")
    assert main(["eval", "needle", str(tmp_path / "hf"), "--lengths", "10", "--tokenizer", "bytes"]) == 2
    assert "too short for the needle" in capsys.readouterr().err
    assert not (tmp_path / "hf" / "eval").exists()
