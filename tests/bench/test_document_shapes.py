"""bench/document_shapes.py on the CPU: every section comes out, new draws are timed twice each."""

document_shapes = __import__("bench.document_shapes", fromlist=["main"])


def test_smoke_run_prints_every_section(capsys):
    document_shapes.main(
        ["--seq", "1024", "--heads", "2", "--kv-heads", "1", "--head-dim", "8", "--draws", "2", "--iters", "1",
         "--warmup", "0", "--mean-doc", "128", "--fixed-doc", "64", "--dense-shapes", "96", "40x72", "--top", "3"]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "| lognormal | repeated (seed 0)" in printed
    assert printed.count("new / again") == 2
    assert "| fixed     | repeated (seed 0)" in printed
    assert printed.count("one repeated step: wall") == 2
    for shape in ("96 causal  ", "40 x 72    "):
        assert f"| {shape} | torch   |" in printed and f"| {shape} | varlen  |" in printed
