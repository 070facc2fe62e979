"""bench/document_shapes.py on the CPU: every section comes out, new draws are timed twice each."""

document_shapes = __import__("bench.document_shapes", fromlist=["main"])


def test_smoke_run_prints_every_section(capsys, tmp_path):
    document_shapes.main(
        ["--seq", "1024", "--heads", "2", "--kv-heads", "1", "--head-dim", "8", "--draws", "2", "--iters", "1",
         "--warmup", "0", "--mean-doc", "128", "--fixed-doc", "64", "--dense-shapes", "96", "40x72", "--top", "3",
         "--trace", str(tmp_path / "step")]
    )  # fmt: skip
    for kind in ("lognormal", "fixed"):
        assert '"traceEvents"' in (tmp_path / f"step_{kind}.json").read_text()
    printed = capsys.readouterr().out
    assert "| lognormal | repeated (seed 0)" in printed
    assert printed.count("new / again") == 2
    assert "| fixed     | repeated (seed 0)" in printed
    assert printed.count("one repeated step of 1 call(s), per call: wall") == 2
    for shape in ("96 causal  ", "40 x 72    "):
        assert f"| {shape} | torch   |" in printed and f"| {shape} | varlen  |" in printed


def test_layers_share_one_plan_cache_per_step_and_times_are_per_call(monkeypatch):
    """--layers N: a step is N calls sharing one DocumentPlans (as one model call's layers do), a fresh
    cache per step; reported times are divided by N."""
    seen = []

    def attention(q, k, v, ids, document_plans=None):
        seen.append(document_plans)
        return q * 2 + (k.sum() + v.sum())

    monkeypatch.setattr(document_shapes, "document_attention", attention)
    args = document_shapes.parse_args(["--seq", "16", "--heads", "2", "--kv-heads", "1", "--head-dim", "4",
                                       "--layers", "3"])  # fmt: skip
    step = document_shapes.Step(args, document_shapes.torch.device("cpu"))
    ids = document_shapes.torch.zeros(1, 16, dtype=document_shapes.torch.long)
    step(ids)
    step(ids)
    assert len(seen) == 6 and seen[0] is not None
    assert all(plans is seen[0] for plans in seen[:3]) and all(plans is seen[3] for plans in seen[3:])
    assert seen[3] is not seen[0]
    assert step.per_call(30.0) == 10.0
    seen.clear()
    args.layers = 1
    document_shapes.Step(args, document_shapes.torch.device("cpu"))(ids)
    assert seen == [None]  # one call plans for itself
