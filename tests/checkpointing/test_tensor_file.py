"""Safetensors files written from a precomputed layout; flat-range reads touching only needed rows."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from longloom.checkpointing.checksums import checksum, verify_files
from longloom.checkpointing.tensor_file import (
    TensorFileLayout,
    TensorFileWriter,
    read_flat_range,
    read_header,
    write_tensor_file,
)


def _reference() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "small:uint8": torch.randint(0, 255, (13,), dtype=torch.uint8, generator=generator),
        "w:fp32": torch.randn(3_000_001, generator=generator),  # several write threads, odd size
        "h:bf16": torch.randn(7, 5, generator=generator).bfloat16(),
        "i:int64": torch.arange(9, dtype=torch.int64),
        "empty": torch.empty(0),
    }


def test_pool_layout_file_is_plain_safetensors(tmp_path):
    reference = _reference()
    layout = TensorFileLayout(
        [(k, v.dtype, tuple(v.shape)) for k, v in reference.items()], metadata={"step": 3}
    )
    pool = torch.empty(layout.data_bytes, dtype=torch.uint8)
    for key, value in reference.items():
        layout.view(pool, key).copy_(value)
    write_tensor_file(tmp_path / "a.safetensors", layout, pool)
    loaded = load_file(tmp_path / "a.safetensors")
    assert set(loaded) == set(reference)
    for key, value in reference.items():
        assert torch.equal(loaded[key], value), key
    assert (tmp_path / "a.safetensors").stat().st_size == layout.file_bytes
    assert read_header(tmp_path / "a.safetensors")["__metadata__"] == {"step": "3"}


def test_writer_in_any_order_matches_safetensors_own_writer(tmp_path):
    reference = _reference()
    layout = TensorFileLayout([(k, v.dtype, tuple(v.shape)) for k, v in reference.items()])
    writer = TensorFileWriter(tmp_path / "b.safetensors", layout)
    for key in reversed(list(reference)):
        writer.write(key, reference[key])
    writer.close()
    save_file(reference, tmp_path / "c.safetensors")
    ours, theirs = load_file(tmp_path / "b.safetensors"), load_file(tmp_path / "c.safetensors")
    assert all(torch.equal(ours[k], theirs[k]) for k in reference)
    with pytest.raises(ValueError, match="layout expects"):
        TensorFileWriter(tmp_path / "d.safetensors", layout).write("h:bf16", torch.zeros(5, 7))


def test_read_flat_range_of_multi_dimensional_tensor(tmp_path):
    full = torch.arange(4 * 6 * 5, dtype=torch.float32).view(4, 6, 5)
    save_file({"t": full, "s": torch.tensor(2.5)}, tmp_path / "e.safetensors")
    with safe_open(tmp_path / "e.safetensors", framework="pt") as handle:
        for start, numel in [(0, 120), (7, 1), (29, 31), (30, 30), (119, 1), (55, 0)]:
            assert torch.equal(
                read_flat_range(handle, "t", start, numel), full.view(-1)[start : start + numel]
            )
        assert torch.equal(read_flat_range(handle, "s", 0, 1), torch.tensor([2.5]))
        with pytest.raises(ValueError, match="outside tensor"):
            read_flat_range(handle, "t", 100, 21)


def test_truncated_file_header_is_rejected(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(ValueError, match="truncated"):
        read_header(tmp_path / "x.safetensors")
    (tmp_path / "y.safetensors").write_bytes((10**6).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_header(tmp_path / "y.safetensors")


@pytest.mark.parametrize("threads", [1, 3])
def test_checksums_hashed_while_writing_equal_whole_tensor_checksums(tmp_path, threads):
    # Each write thread hashes 1 MiB pieces right before writing them; the recorded checksum of a
    # tensor must still be the XXH3-64 of all its bytes (what verification computes).
    reference = _reference()
    layout = TensorFileLayout([(k, v.dtype, tuple(v.shape)) for k, v in reference.items()])
    pool = torch.empty(layout.data_bytes, dtype=torch.uint8)
    for key, value in reference.items():
        layout.view(pool, key).copy_(value)
    timings = {}
    record = write_tensor_file(tmp_path / "a.safetensors", layout, pool, threads=threads, timings=timings)
    for key, value in reference.items():
        expected = checksum(value.contiguous().view(-1).view(torch.uint8).numpy())
        assert record["checksums"]["tensors"][key] == expected, key
    assert timings["checksum"] > 0
    assert verify_files(tmp_path, {"a.safetensors": record}) == []

    plain = write_tensor_file(tmp_path / "b.safetensors", layout, pool, threads=threads, checksums=False)
    assert plain == {"bytes": layout.file_bytes}
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_writer_checksums_of_multi_piece_tensors(tmp_path):
    reference = _reference()
    layout = TensorFileLayout([(k, v.dtype, tuple(v.shape)) for k, v in reference.items()])
    writer = TensorFileWriter(tmp_path / "b.safetensors", layout)
    for key, value in reference.items():
        writer.write(key, value)
    writer.close()
    record = writer.record()
    assert record["checksums"]["tensors"]["w:fp32"] == checksum(reference["w:fp32"].numpy())
    assert verify_files(tmp_path, {"b.safetensors": record}) == []


def test_failed_write_raises_and_closes_the_file(tmp_path, monkeypatch):
    from longloom.checkpointing import tensor_file

    reference = _reference()
    layout = TensorFileLayout([(k, v.dtype, tuple(v.shape)) for k, v in reference.items()])
    pool = torch.zeros(layout.data_bytes, dtype=torch.uint8)
    real_write_all, calls = tensor_file._write_all, []

    def full_disk_after_header(fd, data, offset):
        calls.append(offset)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        real_write_all(fd, data, offset)

    monkeypatch.setattr(tensor_file, "_write_all", full_disk_after_header)
    with pytest.raises(OSError, match="No space left"):
        write_tensor_file(tmp_path / "a.safetensors", layout, pool, threads=3)
