import pytest
import torch

from longloom.config import DataConfig
from longloom.data.loader import GlobalBatchLoader
from longloom.data.prepare import prepare_dataset
from longloom.data.synthetic import build_dataset


class Numbered:
    """Sample i holds the number i: batches show which samples they are made of."""

    def __init__(self, length: int, shuffle: bool, seq_len: int = 4):
        self.length, self.shuffle, self.seq_len = length, shuffle, seq_len

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        assert 0 <= index < self.length
        value = torch.full((self.seq_len,), index, dtype=torch.int64)
        return {"tokens": value, "position_ids": torch.arange(self.seq_len), "labels": value + 1}


def _global_batch(dataset, micro, dp, seed, step):
    parts = [GlobalBatchLoader(dataset, micro, rank, dp, seed).batch(step) for rank in range(dp)]
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}


@pytest.mark.parametrize("shuffle", [False, True])
def test_the_global_batch_does_not_depend_on_dp(shuffle):
    dataset = Numbered(length=37, shuffle=shuffle)
    for step in [0, 1, 4, 9, 30]:  # 30 * 8 samples wrap the 37 samples several times
        reference = GlobalBatchLoader(dataset, 8, 0, 1, seed=5).batch(step)
        assert reference["tokens"].shape == (8, 4) and reference["tokens"].dtype == torch.int64
        for micro, dp in [(4, 2), (2, 4), (1, 8)]:
            batch = _global_batch(dataset, micro, dp, 5, step)
            for name in reference:
                assert torch.equal(batch[name], reference[name]), (step, micro, dp, name)


def test_rank_takes_its_slice_of_the_sample_stream():
    dataset = Numbered(length=10**6, shuffle=False)
    loader = GlobalBatchLoader(dataset, micro_batch_size=3, dp_rank=1, dp_size=2, seed=0)
    # Step 5: global samples [30, 36); rank 1 of 2 takes [33, 36).
    assert loader.batch(5)["tokens"][:, 0].tolist() == [33, 34, 35]
    assert loader.global_sample_indices(5) == list(range(30, 36))


def test_shuffled_epochs_are_permutations_seeded_by_seed():
    dataset = Numbered(length=12, shuffle=True)
    loader = GlobalBatchLoader(dataset, 4, 0, 1, seed=1)
    epochs = [[i for s in range(3) for i in loader.global_sample_indices(3 * e + s)] for e in range(3)]
    assert all(sorted(order) == list(range(12)) for order in epochs)  # each sample once per epoch
    assert epochs[0] != epochs[1] and epochs[0] != list(range(12))
    same_seed = GlobalBatchLoader(dataset, 4, 0, 1, seed=1)
    other_seed = GlobalBatchLoader(dataset, 4, 0, 1, seed=2)
    assert same_seed.global_sample_indices(4) == loader.global_sample_indices(4)
    assert other_seed.global_sample_indices(0) != loader.global_sample_indices(0)


def test_state_dict_round_trip_resumes_the_same_batches():
    dataset = build_dataset(DataConfig(source="synthetic:recall", seq_len=32), seed=0)
    loader = GlobalBatchLoader(dataset, 2, 1, 2, seed=0)
    stream = iter(loader)
    for _ in range(3):
        next(stream)
    state = loader.state_dict()
    assert state == {"next_step": 3, "consumed_samples": 12, "global_batch_size": 4, "seed": 0}
    expected = [loader.batch(step) for step in (3, 4)]
    resumed = GlobalBatchLoader(dataset, 2, 1, 2, seed=0)
    resumed.load_state_dict(state)
    resumed_stream = iter(resumed)
    for batch in expected:
        got = next(resumed_stream)
        assert all(torch.equal(got[name], batch[name]) for name in batch)
    assert resumed.state_dict()["next_step"] == 5


def test_resume_with_another_global_batch_continues_at_the_consumed_sample():
    dataset = Numbered(length=1000, shuffle=True)
    loader = GlobalBatchLoader(dataset, 2, 0, 2, seed=3)  # G = 4
    for step in range(5):
        loader.batch(step)
    seen = [i for step in range(5) for i in loader.global_sample_indices(step)]
    bigger = [GlobalBatchLoader(dataset, 2, rank, 4, seed=3) for rank in range(4)]  # G = 8
    for rank_loader in bigger:
        rank_loader.load_state_dict(loader.state_dict())
    after = bigger[0].global_sample_indices(5) + bigger[0].global_sample_indices(6)
    assert bigger[2].batch(5)["tokens"][:, 0].tolist() == after[4:6]
    # No sample repeated or skipped: the first 36 positions of one epoch's permutation.
    reference = GlobalBatchLoader(dataset, 36, 0, 1, seed=3).global_sample_indices(0)
    assert seen + after == reference
    with pytest.raises(ValueError, match="resumed"):
        bigger[0].batch(4)


def test_bad_arguments_and_seed_change():
    dataset = Numbered(length=10, shuffle=True)
    with pytest.raises(ValueError, match="train.micro_batch_size=0"):
        GlobalBatchLoader(dataset, 0, 0, 1, seed=0)
    with pytest.raises(ValueError, match=r"rank 2 is not in \[0, 2\).*parallel.dp"):
        GlobalBatchLoader(dataset, 1, 2, 2, seed=0)
    state = GlobalBatchLoader(dataset, 1, 0, 1, seed=0).state_dict()
    with pytest.raises(ValueError, match="train.seed"):
        GlobalBatchLoader(dataset, 1, 0, 1, seed=1).load_state_dict(state)


def _rank_batch(folder, step):
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    dataset = build_dataset(DataConfig(source=folder, seq_len=16), seed=0)
    return GlobalBatchLoader(dataset, 2, rank, world, seed=11).batch(step)


def test_ranks_in_separate_processes_agree_with_dp1(distributed, tmp_path):
    (tmp_path / "src").mkdir()
    for i in range(5):
        (tmp_path / "src" / f"{i}.txt").write_text(f"text file {i} " * 9)
    prepare_dataset(tmp_path / "src", tmp_path / "out", shard_tokens=100, progress=False)
    dataset = build_dataset(DataConfig(source=str(tmp_path / "out"), seq_len=16), seed=0)
    step = 3 * len(dataset) // 4 + 1  # an epoch boundary lies in the past: the order is reshuffled
    parts = distributed(2, _rank_batch, str(tmp_path / "out"), step)
    reference = GlobalBatchLoader(dataset, 4, 0, 1, seed=11).batch(step)
    for name in reference:
        assert torch.equal(torch.cat([part[name] for part in parts]), reference[name])


class Packed(Numbered):
    """Numbered samples that carry document ids: sample i holds documents [i, i, i + 1, i + 1]."""

    def __getitem__(self, index):
        sample = super().__getitem__(index)
        return sample | {"document_ids": torch.tensor([index, index, index + 1, index + 1])}


def test_document_ids_travel_with_the_batch_unless_every_sample_is_one_document():
    batch = GlobalBatchLoader(Packed(8, shuffle=True), 2, 1, 2, seed=0).batch(3)
    first = batch["tokens"][:, 0]
    assert torch.equal(batch["document_ids"], torch.stack([first, first, first + 1, first + 1], dim=1))
    synthetic = build_dataset(DataConfig(source="synthetic:recall", seq_len=64), seed=0)
    assert "document_ids" in synthetic[0]  # one document per sample: all zeros ...
    assert set(GlobalBatchLoader(synthetic, 2, 0, 1, seed=0).batch(0)) == {"tokens", "position_ids", "labels"}
