"""Training on prepared Arrow data with document masking: per-step losses do not depend on the split."""

import pytest

from longloom.data.prepare import prepare_dataset
from tests.training.test_trainer import _losses

ARROW = ["data.seq_len=64", "model.vocab_size=300", "train.micro_batch_size=2", "model.layer_pattern=LS"]


@pytest.fixture(scope="module")
def packed_corpus(tmp_path_factory):
    """Short text files of 6 to 60 bytes: every 64-token sample packs several documents."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "src").mkdir()
    for i in range(120):
        (root / "src" / f"{i:03d}.txt").write_text(f"document {i}: " + "abc " * (i % 13))
    prepare_dataset(root / "src", root / "shards", shard_tokens=400, progress=False)
    return root / "shards"


def test_document_masking_losses_equal_across_splits(distributed, tmp_path, packed_corpus):
    common = [*ARROW, f"data.source={packed_corpus}"]
    single = _losses(distributed, 1, tmp_path, "single", *common)
    unmasked = _losses(distributed, 1, tmp_path, "unmasked", *common, "data.document_masking=false")
    # The ids reach the model: attention inside documents only gives other losses than across them.
    assert abs(single[0] - unmasked[0]) > 1e-4 * single[0]
    for name, workers, split in (
        ("dp2", 2, ["parallel.dp=2", "train.micro_batch_size=1"]),
        ("ulysses2", 2, ["parallel.ulysses=2"]),
        # One sequence per micro batch: Ulysses attends documents inside a shard where they lie
        # (parallel/ulysses_documents.py), after the trainer reorders them for that split.
        ("ulysses2-b1", 2, ["parallel.ulysses=2", "train.micro_batch_size=1", "train.grad_accum=2"]),
        ("ring2", 2, ["parallel.ring=2"]),
        ("2x2", 4, ["parallel.ulysses=2", "parallel.ring=2"]),
    ):
        losses = _losses(distributed, workers, tmp_path, name, *common, *split)
        assert losses == pytest.approx(single, rel=1e-4), name
