"""Indexed dataset: Megatron's MMIDIDX layout byte for byte, atomic writes, validation of damaged files."""
import os
import struct

import numpy as np
import pytest

from launcher.data.indexed import IndexedDataset, IndexedDatasetWriter, best_dtype
from launcher.errors import UsageError

DOCS = [[5, 6, 7], [1], [], [300, 2, 9, 4]]


def _write(prefix, docs=DOCS, dtype=np.uint16):
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for doc in docs:
            writer.add_document(doc)
    return str(prefix)


def _megatron_idx(lengths, doc_index, code):
    """The .idx Megatron's writer produces, spelled out field by field."""
    itemsize = {4: 4, 8: 2}[code]
    pointers = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) * itemsize
    return (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
            + struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(doc_index))
            + np.asarray(lengths, np.int32).tobytes() + pointers.tobytes()
            + np.asarray(doc_index, np.int64).tobytes())


@pytest.mark.parametrize("dtype, code", [(np.uint16, 8), (np.int32, 4)])
def test_layout_is_megatrons(tmp_path, dtype, code):
    prefix = _write(tmp_path / "d", dtype=dtype)
    lengths = [len(d) for d in DOCS]
    assert open(prefix + ".idx", "rb").read() == _megatron_idx(lengths, range(len(DOCS) + 1), code)
    assert open(prefix + ".bin", "rb").read() == np.concatenate(DOCS).astype(dtype).tobytes()


def test_round_trip(tmp_path):
    ds = IndexedDataset(_write(tmp_path / "d"))
    assert len(ds) == 4 and ds.dtype == np.uint16 and ds.num_tokens == 8
    assert ds.sizes.tolist() == [3, 1, 0, 4]
    for i, doc in enumerate(DOCS):
        assert ds[i].tolist() == doc
    assert ds[-1].tolist() == DOCS[-1]
    assert ds.get(3, 1, 2).tolist() == [2, 9]
    assert ds.get(3, 2).tolist() == [9, 4]
    assert ds.get(0, 1, 100).tolist() == [6, 7]
    with pytest.raises(IndexError):
        ds[4]


def test_reads_megatron_sentence_split_documents(tmp_path):
    # Megatron with --split-sentences: 4 sequences grouped into 2 documents.
    lengths, doc_index = [2, 3, 1, 2], [0, 3, 4]
    (tmp_path / "m.idx").write_bytes(_megatron_idx(lengths, doc_index, 4))
    (tmp_path / "m.bin").write_bytes(np.arange(8, dtype=np.int32).tobytes())
    ds = IndexedDataset(tmp_path / "m")
    assert ds.dtype == np.int32 and len(ds) == 2
    assert ds[0].tolist() == [0, 1, 2, 3, 4, 5] and ds[1].tolist() == [6, 7]


def test_best_dtype():
    assert best_dtype(50257) == np.uint16 and best_dtype(65536) == np.uint16
    assert best_dtype(65537) == np.int32 and best_dtype(250_000) == np.int32


def test_empty_dataset(tmp_path):
    ds = IndexedDataset(_write(tmp_path / "e", docs=[]))
    assert len(ds) == 0 and ds.num_tokens == 0 and ds.max_token_id() == -1


def test_bulk_add_matches_single(tmp_path):
    with IndexedDatasetWriter(tmp_path / "bulk", np.uint16) as writer:
        writer.add_documents(np.concatenate(DOCS).astype(np.int64), [len(d) for d in DOCS])
    _write(tmp_path / "single")
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"bulk{ext}").read_bytes() == (tmp_path / f"single{ext}").read_bytes()


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    prefix = tmp_path / "d"
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(prefix, np.uint16) as writer:
            writer.add_document([1, 2, 3])
            assert (tmp_path / "d.bin.tmp").exists() and not (tmp_path / "d.bin").exists()
            raise RuntimeError("crash mid-way")
    assert sorted(os.listdir(tmp_path)) == []


def test_atomic_write_keeps_the_old_dataset_on_error(tmp_path):
    prefix = _write(tmp_path / "d")
    before = [open(prefix + ext, "rb").read() for ext in (".bin", ".idx")]
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(prefix, np.uint16) as writer:
            writer.add_document([9] * 100)
            raise RuntimeError("crash")
    assert [open(prefix + ext, "rb").read() for ext in (".bin", ".idx")] == before
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]


def test_final_names_appear_only_on_close(tmp_path):
    writer = IndexedDatasetWriter(tmp_path / "d", np.uint16)
    writer.add_document([1, 2])
    assert sorted(os.listdir(tmp_path)) == ["d.bin.tmp"]
    writer.close()
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]


def test_writer_rejects_ids_beyond_vocab(tmp_path):
    with pytest.raises(UsageError, match="token id 400 is outside the vocab"):
        with IndexedDatasetWriter(tmp_path / "d", np.uint16, vocab_size=400) as writer:
            writer.add_document([1, 400])
    with pytest.raises(UsageError, match="token id 70000"):
        with IndexedDatasetWriter(tmp_path / "d", np.uint16) as writer:
            writer.add_document([70000])
    with pytest.raises(UsageError, match="token id -1"):
        with IndexedDatasetWriter(tmp_path / "d", np.int32) as writer:
            writer.add_document([-1])
    with pytest.raises(UsageError, match="not one of them"):
        IndexedDatasetWriter(tmp_path / "d", np.float32)
    assert os.listdir(tmp_path) == []


def test_check_vocab(tmp_path):
    ds = IndexedDataset(_write(tmp_path / "d"))
    assert ds.max_token_id() == 300
    ds.check_vocab(301)
    with pytest.raises(UsageError, match="token id 300, beyond the tokenizer's vocab of 300"):
        ds.check_vocab(300)


def _damage(tmp_path, ext, edit):
    prefix = _write(tmp_path / "d")
    path = prefix + ext
    data = bytearray(open(path, "rb").read())
    with open(path, "wb") as f:
        f.write(edit(data))
    return prefix


def _poke(offset, value):
    def edit(data):
        data[offset:offset + len(value)] = value
        return data
    return edit


@pytest.mark.parametrize("ext, edit, message", [
    (".idx", lambda d: d[:20], "shorter than the 34-byte header"),
    (".idx", lambda d: d[:-8], "truncated or corrupt"),
    (".idx", lambda d: d + b"\0" * 3, "truncated or corrupt"),
    (".idx", _poke(0, b"XXXXXXX"), "not an MMIDIDX index"),
    (".idx", _poke(9, struct.pack("<Q", 2)), "version 2"),
    (".idx", _poke(17, bytes([6])), "dtype code 6"),
    (".idx", _poke(18, struct.pack("<Q", 10**6)), "truncated or corrupt"),
    (".idx", _poke(34, struct.pack("<i", 4)), "offsets do not follow"),
    (".idx", _poke(34 + 4 * 4 + 8 * 4, struct.pack("<q", 1)), "document index"),
    (".idx", lambda d: b"", "shorter than"),
    (".bin", lambda d: d[:-2], "the index says 16"),
    (".bin", lambda d: d + b"\0\0", "the index says 16"),
])
def test_damaged_files_are_refused(tmp_path, ext, edit, message):
    prefix = _damage(tmp_path, ext, edit)
    with pytest.raises(UsageError, match=message):
        IndexedDataset(prefix)


@pytest.mark.parametrize("missing", [".bin", ".idx"])
def test_missing_file(tmp_path, missing):
    prefix = _write(tmp_path / "d")
    os.remove(prefix + missing)
    with pytest.raises(UsageError, match=f"d{missing} not found"):
        IndexedDataset(prefix)


def test_pickles_by_prefix_not_by_contents(tmp_path):
    import pickle

    ds = IndexedDataset(_write(tmp_path / "d", docs=[list(range(1000))] * 20))
    blob = pickle.dumps(ds)
    assert len(blob) < 500  # not the 40 KB of tokens
    again = pickle.loads(blob)
    assert len(again) == 20 and again[3].tolist() == list(range(1000))
