"""GPT dataset: split and blend arithmetic, packing across documents, seeded shuffles, the cached index."""
import multiprocessing
import os

import numpy as np
import pytest

from launcher.data import gpt_dataset
from launcher.data.gpt_dataset import (SPLIT_SEED, BlendedDataset, apportion, build_gpt_datasets, parse_blend,
                                       parse_split, split_documents, split_ranges)
from launcher.data.indexed import IndexedDataset, IndexedDatasetWriter
from launcher.errors import UsageError


def _make(prefix, num_docs=50, seed=0, base=0, eod=0):
    """Documents of varied lengths whose ids (base+1, base+2, ...) are unique, each ended by eod."""
    rng = np.random.default_rng(seed)
    next_id = base + 1
    with IndexedDatasetWriter(prefix, np.int32) as writer:
        for _ in range(num_docs):
            n = int(rng.integers(1, 40))
            writer.add_document(list(range(next_id, next_id + n)) + [eod])
            next_id += n
    return str(prefix)


# --- parsing ---

@pytest.mark.parametrize("text, expected", [
    ("98,2,0", (0.98, 0.02, 0.0)),
    ("949,50,1", (0.949, 0.05, 0.001)),
    ("1/1/2", (0.25, 0.25, 0.5)),
    ("100", (1.0, 0.0, 0.0)),
    (" 8, 2 ", (0.8, 0.2, 0.0)),
    ("0.5,0.5,0", (0.5, 0.5, 0.0)),
])
def test_parse_split(text, expected):
    assert parse_split(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "0,0,0", "-1,2,0", "a,b,c", "1,2,3,4", "nan,1,0", "inf,1,0", "98,,2"])
def test_parse_split_refuses(text):
    with pytest.raises(UsageError, match="split"):
        parse_split(text)


def test_parse_blend():
    blend = parse_blend("0.3 a 0.7 b")
    assert [p for _, p in blend] == ["a", "b"] and [w for w, _ in blend] == pytest.approx([0.3, 0.7])
    assert parse_blend("3 a 1 b") == [(0.75, "a"), (0.25, "b")]
    assert parse_blend("a b c") == [(1 / 3, "a"), (1 / 3, "b"), (1 / 3, "c")]
    assert parse_blend("data/x.bin") == [(1.0, "data/x")]
    assert parse_blend("0 a 1 b") == [(1.0, "b")]


@pytest.mark.parametrize("text", ["", "  ", "0.3 a b", "a 0.3", "0.3 a 0.7", "-1 a 2 b", "0 a 0 b", "nan a"])
def test_parse_blend_refuses(text):
    with pytest.raises(UsageError):
        parse_blend(text)


def test_split_ranges():
    assert split_ranges(100, parse_split("98,2,0")) == [(0, 98), (98, 100), (100, 100)]
    assert split_ranges(10, parse_split("1,1,1")) == [(0, 3), (3, 7), (7, 10)]
    assert split_ranges(7, parse_split("949,50,1")) == [(0, 7), (7, 7), (7, 7)]
    for n in (0, 1, 13, 1000):
        ranges = split_ranges(n, parse_split("33,33,34"))
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_apportion():
    assert apportion([0.3, 0.7], 10).tolist() == [3, 7]
    assert apportion([1 / 3] * 3, 10).tolist() == [4, 3, 3]
    assert apportion([0.5, 0.5], 0).tolist() == [0, 0]
    counts = apportion([0.123, 0.456, 0.421], 997)
    assert counts.sum() == 997 and np.all(np.abs(counts - np.array([0.123, 0.456, 0.421]) * 997) < 1)


# --- samples ---

def _stream_of(ds, doc_order):
    return np.concatenate([ds[int(d)] for d in doc_order])


def test_samples_pack_documents_into_seq_len_plus_one(tmp_path):
    prefix = _make(tmp_path / "d")
    train, valid, test = build_gpt_datasets(prefix, "80,20,0", seq_len=16, seed=1, num_samples=(40, 5, 0))
    assert test is None and len(train) == 40 and len(valid) == 5
    indexed = IndexedDataset(prefix)
    stream = _stream_of(indexed, train._doc_order)
    for i in range(len(train)):
        sample = train[i]
        assert sample.dtype == np.int64 and sample.shape == (17,)
        k = int(train._shuffle[i])
        assert sample.tolist() == stream[k * 16:k * 16 + 17].tolist()  # consecutive samples overlap by one
    train_docs, valid_docs, _ = split_documents(50, parse_split("80,20,0"))
    assert {int(d) for d in train._doc_order} == set(train_docs.tolist())
    assert {int(d) for d in valid._doc_order} <= set(valid_docs.tolist())
    # Each epoch uses every document of the split once.
    assert sorted(train._doc_order[:40].tolist()) == train_docs.tolist()


# --- the split ---

def test_split_samples_the_whole_corpus():
    n = 1000
    train, valid, test = split_documents(n, parse_split("98,2,0"))
    assert (len(train), len(valid), len(test)) == (980, 20, 0)
    assert np.intersect1d(train, valid).size == 0 and np.union1d(train, valid).tolist() == list(range(n))
    # Spread over the corpus, not its tail: validation documents in every quarter of the document order.
    assert sorted(set((valid // (n // 4)).tolist())) == [0, 1, 2, 3]
    assert np.array_equal(split_documents(n, parse_split("98,2,0"))[1], valid)  # no run setting changes it
    # A smaller train fraction only moves documents out of train: held-out documents stay held out.
    assert set(valid.tolist()) <= set(split_documents(n, parse_split("90,10,0"))[1].tolist())
    assert set(valid.tolist()) <= set(np.concatenate(split_documents(n, parse_split("98,1,1"))[1:]).tolist())


def test_validation_sequences_do_not_depend_on_the_seed(tmp_path):
    prefix = _make(tmp_path / "d", num_docs=200)
    train1, valid1, _ = build_gpt_datasets(prefix, "90,10,0", 16, seed=1, num_samples=(20, 12, 0))
    train2, valid2, _ = build_gpt_datasets(prefix, "90,10,0", 16, seed=2, num_samples=(20, 12, 0))
    assert all(np.array_equal(valid1[i], valid2[i]) for i in range(12))
    assert not all(np.array_equal(train1[i], train2[i]) for i in range(20))  # training order does follow it
    # Train and validation hold different documents (token ids are unique per document here).
    train_tokens = {t for i in range(20) for t in train1[i].tolist() if t}
    valid_tokens = {t for i in range(12) for t in valid1[i].tolist() if t}
    assert train_tokens.isdisjoint(valid_tokens)
    # A shorter evaluation (fewer eval iterations) evaluates a subset of the longer one.
    _, fewer, _ = build_gpt_datasets(prefix, "90,10,0", 16, seed=3, num_samples=(20, 5, 0))
    assert {tuple(fewer[i].tolist()) for i in range(5)} <= {tuple(valid1[i].tolist()) for i in range(12)}


def test_cache_entry_records_the_document_shuffle(tmp_path):
    import json

    prefix = _make(tmp_path / "d")
    build_gpt_datasets(prefix, "90,10,0", 16, 3, (4, 4, 0), cache_dir=str(tmp_path / "c"))
    descriptions = [json.loads((tmp_path / "c" / e / "description.json").read_text())
                    for e in sorted(os.listdir(tmp_path / "c"))]
    assert [d["split"] for d in descriptions] == ["train", "valid"]
    assert all(d["version"] == 2 and d["documents"]["shuffled_by"] == SPLIT_SEED for d in descriptions)
    assert [d["seed"] for d in descriptions] == [3, SPLIT_SEED]


def test_as_many_epochs_as_needed(tmp_path):
    prefix = _make(tmp_path / "d", num_docs=5)
    tokens = IndexedDataset(prefix).num_tokens
    (train, _, _) = build_gpt_datasets(prefix, "100", seq_len=8, seed=0, num_samples=(tokens, 0, 0))
    assert len(train._doc_order) >= 8 * 5  # 8 epochs of 5 documents at least
    assert all(train[i].shape == (9,) for i in range(0, len(train), 7))


def test_deterministic_in_seed(tmp_path):
    prefix = _make(tmp_path / "d")
    a = build_gpt_datasets(prefix, "100", 16, seed=7, num_samples=(30, 0, 0), cache_dir=str(tmp_path / "c1"))[0]
    b = build_gpt_datasets(prefix, "100", 16, seed=7, num_samples=(30, 0, 0), cache_dir=str(tmp_path / "c2"))[0]
    c = build_gpt_datasets(prefix, "100", 16, seed=8, num_samples=(30, 0, 0), cache_dir=str(tmp_path / "c3"))[0]
    assert all(np.array_equal(a[i], b[i]) for i in range(30))
    assert not all(np.array_equal(a[i], c[i]) for i in range(30))


def test_index_is_cached_and_built_once(tmp_path, monkeypatch):
    prefix = _make(tmp_path / "d")
    calls = []
    real = gpt_dataset.build_sample_index
    monkeypatch.setattr(gpt_dataset, "build_sample_index", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = build_gpt_datasets(prefix, "90,10,0", 16, 3, (20, 4, 0))
    assert len(calls) == 2
    entries = sorted(p for p in os.listdir(tmp_path) if ".train-" in p or ".valid-" in p)
    assert len(entries) == 2 and all(sorted(os.listdir(tmp_path / e)) ==
                                     ["description.json", "doc_order.npy", "shuffle.npy", "starts.npy"]
                                     for e in entries)
    second = build_gpt_datasets(prefix, "90,10,0", 16, 3, (20, 4, 0))
    assert len(calls) == 2  # loaded, not rebuilt
    assert all(np.array_equal(first[0][i], second[0][i]) for i in range(20))
    build_gpt_datasets(prefix, "90,10,0", 16, 3, (21, 4, 0))
    assert len(calls) == 3  # other settings, another entry


def test_cache_dir(tmp_path):
    (tmp_path / "data").mkdir()
    prefix = _make(tmp_path / "data" / "d")
    build_gpt_datasets(prefix, "100", 16, 3, (10, 0, 0), cache_dir=str(tmp_path / "cache"))
    assert sorted(os.listdir(tmp_path / "data")) == ["d.bin", "d.idx"]
    assert len(os.listdir(tmp_path / "cache")) == 1


def test_rebuilt_data_invalidates_the_cache(tmp_path):
    prefix = _make(tmp_path / "d", seed=0)
    old = build_gpt_datasets(prefix, "100", 16, 3, (10, 0, 0))[0]
    old_first = old[0].copy()
    _make(tmp_path / "d", num_docs=60, seed=1, base=10_000)
    new = build_gpt_datasets(prefix, "100", 16, 3, (10, 0, 0))[0]
    assert not np.array_equal(new[0], old_first) and new[0].max() > 10_000


def _build_in_child(args):
    prefix, cache = args
    ds = build_gpt_datasets(prefix, "100", 16, 5, (500, 0, 0), cache_dir=cache)[0]
    return [ds[i].tolist() for i in range(0, 500, 50)]


def test_two_processes_building_at_once(tmp_path):
    prefix = _make(tmp_path / "d", num_docs=200)
    cache = str(tmp_path / "cache")
    with multiprocessing.get_context("fork").Pool(2) as pool:
        a, b = pool.map(_build_in_child, [(prefix, cache)] * 2)
    assert a == b
    assert len(os.listdir(cache)) == 1  # one entry, no leftovers of the loser
    assert _build_in_child((prefix, cache)) == a


def test_blend_counts_and_interleaving(tmp_path):
    a = _make(tmp_path / "a", base=0)
    b = _make(tmp_path / "b", base=100_000)
    train, _, _ = build_gpt_datasets(f"0.3 {a} 0.7 {b}", "100", 8, 0, (100, 0, 0))
    assert isinstance(train, BlendedDataset) and len(train) == 100
    from_b = np.array([train[i].max() > 100_000 for i in range(100)])
    assert from_b.sum() == 70
    assert all(abs(from_b[:k].sum() - 0.7 * k) <= 1.5 for k in range(1, 101))  # evenly spread
    again, _, _ = build_gpt_datasets(f"0.3 {a} 0.7 {b}", "100", 8, 0, (100, 0, 0))
    assert all(np.array_equal(train[i], again[i]) for i in range(100))
    equal, _, _ = build_gpt_datasets(f"{a} {b}", "100", 8, 0, (10, 0, 0))
    assert sum(equal[i].max() > 100_000 for i in range(10)) == 5


def test_zero_fraction_or_count_gives_none(tmp_path):
    prefix = _make(tmp_path / "d")
    assert build_gpt_datasets(prefix, "100,0,0", 8, 0, (5, 5, 5))[1:] == (None, None)
    assert build_gpt_datasets(prefix, "1,1,1", 8, 0, (5, 0, 0))[1:] == (None, None)


def test_bad_inputs(tmp_path):
    prefix = _make(tmp_path / "d", num_docs=10)
    with pytest.raises(UsageError, match="does not sum"):
        build_gpt_datasets(prefix, "0,0,0", 8, 0, (5, 0, 0))
    with pytest.raises(UsageError, match="leaves the valid part"):
        build_gpt_datasets(prefix, "98,2,0", 8, 0, (5, 5, 0))  # 2% of 10 documents is none
    with pytest.raises(UsageError, match="not found"):
        build_gpt_datasets(str(tmp_path / "missing"), "100", 8, 0, (5, 0, 0))
    with pytest.raises(UsageError, match="seq_len"):
        build_gpt_datasets(prefix, "100", 0, 0, (5, 0, 0))
    with pytest.raises(UsageError, match="num_samples"):
        build_gpt_datasets(prefix, "100", 8, 0, (5, 0))
    with pytest.raises(UsageError, match="beyond the tokenizer's vocab"):
        build_gpt_datasets(prefix, "100", 8, 0, (5, 0, 0), vocab_size=100)
    build_gpt_datasets(prefix, "100", 8, 0, (5, 0, 0), vocab_size=100_000)


def test_unwritable_data_folder_still_works(tmp_path, monkeypatch):
    prefix = _make(tmp_path / "d")
    import launcher.data.index_cache as index_cache

    def refuse(*args, **kwargs):
        raise PermissionError("read-only")
    monkeypatch.setattr(index_cache.tempfile, "mkdtemp", refuse)
    train = build_gpt_datasets(prefix, "100", 8, 0, (5, 0, 0))[0]
    assert train[4].shape == (9,)
