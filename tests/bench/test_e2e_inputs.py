"""bench/e2e.py's inputs and its run harness, in process (the full CPU run is the manual command in e2e.py)."""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

from bench.e2e import Run, ratios, summarise
from bench.e2e_inputs import PRESETS, pattern_period, pattern_window, write_hf_folder, write_token_folder
from longloom.data.packing import IGNORE_INDEX, PackedTokenDataset


def test_every_sample_is_the_pattern_with_every_label_valid(tmp_path):
    seq_len, vocab = 96, 512
    folder = write_token_folder(tmp_path / "data", seq_len, vocab, samples=5)
    dataset = PackedTokenDataset.from_folder(folder, seq_len)
    window = pattern_window(seq_len, vocab)
    assert len(dataset) == 5 and seq_len % pattern_period(seq_len) == 0
    for index in range(len(dataset)):
        sample = dataset[index]
        assert torch.equal(sample["tokens"], torch.from_numpy(window[:-1]))
        assert torch.equal(sample["labels"], torch.from_numpy(window[1:]))
        assert (sample["labels"] != IGNORE_INDEX).all() and (sample["document_ids"] == 0).all()
        assert torch.equal(sample["position_ids"], torch.arange(seq_len))
    assert window.max() < vocab - 1  # the folder's EOS never occurs


def test_hf_folder_loads_in_transformers_with_the_preset_shape(tmp_path):
    from transformers import AutoModelForCausalLM

    shape = PRESETS["tiny"]
    folder, seconds = write_hf_folder(tmp_path / "hf", shape, max_positions=256)
    assert seconds > 0 and write_hf_folder(folder, shape, max_positions=256)[1] == 0.0  # reused
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads) == (64, 2, 2)
    assert (config.intermediate_size, config.vocab_size, config.tie_word_embeddings) == (128, 512, False)
    weight = model.model.layers[0].mlp.up_proj.weight.float()
    assert abs(weight.std().item() - 0.02) < 0.005 and model.model.norm.weight.eq(1).all()


def test_run_timestamps_phases_reads_metrics_and_times_out(tmp_path):
    rows = [
        {"step": s, "loss": 5.0 - s, "tokens_per_s": 100.0 * s, "step_time_s": 1.0 / s} for s in (1, 2, 3)
    ]
    script = "import json\nprint('split: dp=1 ulysses=1 ring=1')\nprint('phase engine_init')\n"
    script += "print('activation offload: ... pool 2.00 GiB in 3 buffers, page-locked in 4.5 s, 1.2 s of it "
    script += "holding up the forward (the rest ahead, on the pool thread)')\n"
    script += "print('GPU memory after the first step: peak allocated 38 GiB, peak reserved 70 GiB; reserved now by "
    script += "stream: compute 39.38 GiB (21.82 GiB in use), ZeRO-3 parameter gather 30.18 GiB (0 B in use), "
    script += "stream 0x1cb28550 960.00 MiB (0 B in use); allocator retries 0')\n"
    script += "".join(f"print({'metrics ' + json.dumps(row)!r})\n" for row in rows)
    run = Run([sys.executable, "-c", script], tmp_path / "out.log", {}, None, timeout=60)
    assert run.run() == 0
    assert list(run.marks)[:4] == ["dist_init", "engine_init", "first_step", "exit"]
    result = summarise("alst", 8, 1, 0, run, warmup=1)
    assert result["tokens_per_s"] == np.median([200.0, 300.0]) and result["loss"] == "4.000 -> 2.000"
    assert (result["pinning_s"], result["pinning_waited_s"]) == (4.5, 1.2)
    assert result["stream_reserved_gib"] == {
        "compute": 39.38, "ZeRO-3 parameter gather": 30.18, "stream 0x1cb28550": 0.94
    }  # fmt: skip
    hung = Run(
        [sys.executable, "-c", "import time; time.sleep(30)"], tmp_path / "hung.log", {}, None, timeout=1
    )
    assert hung.run() == 124


def test_ratios_keep_labelled_variants_apart_from_the_alst_comparison():
    def row(system, tokens_per_s, label=None, seq_len=262144):
        return {
            "system": system,
            "gpus": 2,
            "seq_len": seq_len,
            "exit": 0,
            "tokens_per_s": tokens_per_s,
            "label": label,
        }

    lines = ratios([row("longloom", 3000.0), row("alst", 2000.0), row("longloom", 6000.0, label="lasp2h")])
    assert lines == [
        "- 2 GPU(s), 262144 tokens: longloom / alst tokens/s = 1.500 (target >= 1.5)",
        "- 2 GPU(s), 262144 tokens: longloom [lasp2h] / longloom tokens/s = 2.000",
    ]
    # A variant alone (no unlabelled longloom row at its length) is not compared with ALST.
    assert ratios([row("alst", 2000.0), row("longloom", 6000.0, label="lasp2h")]) == []
