"""bench/longest.py's search and failure kinds, bench/convergence.py's corpus and curve comparison, in process."""

from __future__ import annotations

import pytest

from bench.convergence import relative_difference
from bench.convergence_corpus import MIN_BYTES, docstrings, gather
from bench.longest import ERROR, FITS, NO_FIT, classify, lengths, search_state


def bisect(limit: int, candidates: list[int], errors: frozenset[int] = frozenset()) -> tuple[dict, list[int]]:
    """Drives search_state with a fake probe: lengths <= limit fit; returns the final state and probes run."""
    outcomes, probed = {}, []
    while (state := search_state(candidates, outcomes))["next"] is not None:
        length = state["next"]
        probed.append(length)
        outcomes[length] = ERROR if length in errors else FITS if length <= limit else NO_FIT
    return state, probed


@pytest.mark.parametrize("limit", [0, 32768, 100_000, 524288, 1048576, 2_000_000])
def test_the_search_finds_the_longest_fitting_length_in_log2_probes(limit):
    candidates = lengths(32768, 1048576, 32768)
    first = search_state(candidates, {})
    state, probed = bisect(limit, candidates)
    fitting = [n for n in candidates if n <= limit]
    assert state["longest"] == (max(fitting) if fitting else None)
    assert state["first_fail"] == next((n for n in candidates if n > limit), None)
    assert len(probed) <= first["left"] == 6  # ceil(log2(32 + 1))
    assert len(set(probed)) == len(probed) and not state["inconsistent"]


def test_low_first_settles_a_setting_that_never_fits_in_one_probe():
    candidates = lengths(32768, 262144, 32768)
    assert search_state(candidates, {}, low_first=True)["next"] == 32768
    state = search_state(candidates, {32768: NO_FIT}, low_first=True)
    assert state["next"] is None and state["longest"] is None and state["first_fail"] == 32768
    assert search_state(candidates, {32768: FITS}, low_first=True)["next"] == 163840  # then bisects


def test_an_error_stops_the_search_and_a_fit_above_a_failure_is_inconsistent():
    candidates = lengths(256, 2048, 256)
    state, probed = bisect(2048, candidates, errors=frozenset({1024}))
    assert probed == [1024] and state["errors"] == [1024] and state["next"] is None
    state = search_state(candidates, {512: NO_FIT, 1536: FITS})
    assert state["longest"] == 1536 and state["inconsistent"] == [512]
    with pytest.raises(ValueError, match="--low"):
        lengths(4096, 1024, 256)


def test_failures_are_classified_by_exit_code_and_log():
    assert classify(0, 2, 2, "") == (FITS, "")
    assert classify(124, 1, 2, "CUDA out of memory") == (NO_FIT, "timeout")
    assert classify(1, 0, 2, "torch.OutOfMemoryError: CUDA out of memory. Tried") == (NO_FIT, "GPU OOM")
    assert classify(1, 0, 2, "Signal 9 (SIGKILL) received by PID 12") == (NO_FIT, "host OOM")
    assert classify(-9, 0, 2, "") == (NO_FIT, "host OOM (SIGKILL)")
    assert classify(1, 0, 2, "ConfigError: estimated GPU memory per worker: 150 GiB")[1].startswith("refused")
    pinned = (
        "longloom: error: pinned host memory needed: 2.53 MiB per host (...) exceeds the 104.86 KiB allowed"
    )
    assert classify(1, 0, 2, pinned) == (NO_FIT, "refused: memory estimate")
    assert classify(1, 0, 2, "ValueError: heads 3 must divide") == (ERROR, "exit 1")
    assert classify(0, 1, 2, "") == (ERROR, "exit 0 after 1 of 2 steps")


def test_the_corpus_keeps_docs_and_docstrings_once_each(tmp_path):
    package = tmp_path / "site" / "pkg"
    (package / "sub").mkdir(parents=True)
    long_text = "A real paragraph of documentation. " * 10
    (package / "README.md").write_text(long_text)
    (package / "sub" / "copy.rst").write_text(long_text + "\n")  # the same text: kept once
    (package / "short.txt").write_text("tiny")  # under MIN_BYTES: left out
    (package / "mod.py").write_text(
        f'"""{long_text}"""\n\ndef f():\n    """{long_text[::-1]}"""\n    return 1\n'
    )
    (package / "data.bin").write_bytes(b"\0" * 500)
    manifest = gather(tmp_path / "out", [package], max_bytes=10**6)
    files = sorted((tmp_path / "out").glob("*.txt"))
    assert manifest["documents"] == len(files) == 2
    assert manifest["skipped"] == {"short": 1, "duplicate": 1}
    assert "def f" not in "".join(f.read_text() for f in files)  # docstrings, not code
    assert docstrings("x = (") == "" and len(long_text) > MIN_BYTES
    assert gather(tmp_path / "again", [package], 10**6)["sha256"] == manifest["sha256"]  # deterministic


def test_the_curve_difference_is_the_mean_relative_gap_over_the_last_steps():
    reference = [4.0, 3.0, 2.0, 2.0]
    assert relative_difference(reference, reference, 100) == 0.0
    assert relative_difference([9.0, 9.0, 2.02, 1.98], reference, 2) == pytest.approx(0.01)
    assert relative_difference([4.0, 3.3], reference, 100) == pytest.approx(0.05)  # common steps only


def test_the_report_judges_parallel_curves_and_shows_the_noise_floor_apart(tmp_path, capsys):
    import argparse
    import json

    from bench.convergence import NOISE_FLOOR, report

    base = [4.0, 3.0, 2.0, 2.0]
    curves = {"1gpu": base, "ulysses2": [4.0, 3.0, 2.01, 2.01], NOISE_FLOOR: [4.0, 3.0, 2.06, 2.06]}
    for name, losses in curves.items():
        folder = tmp_path / "results" / name
        folder.mkdir(parents=True)
        lines = [json.dumps({"step": step + 1, "loss": loss}) for step, loss in enumerate(losses)]
        (folder / "metrics.jsonl").write_text("\n".join(lines))
        info = {"workers": 1, "parallel": {"ulysses": 1}, "preset": "tiny", "seq_len": 8, "steps": 4,
                "median_step_s": 0.1, "corpus": {"sha256": "same"}, "overrides": ["train.grad_accum=2"]}  # fmt: skip
        (folder / "run.json").write_text(json.dumps(info))
    args = argparse.Namespace(results=tmp_path / "results", out=tmp_path, last=2, record=False)
    # ulysses2 is 0.5% off: within the 1% target; the noise floor (3%) is reported, not judged.
    assert report(args) == 0
    printed = capsys.readouterr().out
    assert f"bf16 noise floor ({NOISE_FLOOR}, model.mlp_tiles=2): 3.000%" in printed
    assert "every parallel curve within 1% of 1gpu: yes" in printed
    assert "- ulysses2 ran with train.grad_accum=2" in printed  # a changed setting is shown beside its curve
    (tmp_path / "results" / "ulysses2" / "metrics.jsonl").write_text(
        "\n".join(json.dumps({"step": s + 1, "loss": v}) for s, v in enumerate([4.0, 3.0, 2.04, 2.04]))
    )
    assert report(args) == 1
    assert "every parallel curve within 1% of 1gpu: NO" in capsys.readouterr().out
