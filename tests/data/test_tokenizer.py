"""Tokenizers: exact round trips, training and loading, GPT-2 files, the transformers export, bad input."""
import json

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from launcher.data.jieba_split import split_words
from launcher.data.tokenizer import (EOD_TOKEN, META_FILE, TOKENIZER_FILE, Tokenizer, load_tokenizer,
                                     train_tokenizer)
from launcher.errors import UsageError

# Chinese (incl. rare extension-B ideographs), Latin, digits, punctuation, emoji, whitespace of all kinds.
_ALPHABET = st.one_of(
    st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF),
    st.characters(min_codepoint=0x20000, max_codepoint=0x2A6DF),
    st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF),
    st.sampled_from(list("abcXYZ019 _.,;:()[]{}'\"#\t\n\r，。？！「」")),
    st.characters(codec="utf-8"),
)
TEXTS = st.text(alphabet=_ALPHABET, max_size=80)
_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_SETTINGS
@given(text=TEXTS)
def test_round_trip_property(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


@_SETTINGS
@given(text=TEXTS)
def test_jieba_words_concatenate_to_the_text(text):
    assert "".join(split_words(text)) == text


def test_round_trip_named_cases(tokenizer, sample_texts):
    cases = sample_texts + ["", " ", "    ", "\t\t\t", "  leading and trailing  ", "a\u3000b", "🙂" * 5,
                            "混合 mixed 文本\twith\ttabs", "x" * 3000]
    for text in cases:
        assert tokenizer.decode(tokenizer.encode(text)) == text, repr(text)


def test_attributes(tokenizer, kind):
    assert tokenizer.kind == kind
    assert tokenizer.eod_id == tokenizer.backend.token_to_id(EOD_TOKEN)
    assert tokenizer.pad_id == tokenizer.eod_id
    assert isinstance(tokenizer.vocab_size, int) and 257 <= tokenizer.vocab_size <= 400
    ids = tokenizer.encode("一些文字 and some words")
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode([tokenizer.eod_id]) == EOD_TOKEN


def test_batch_matches_single(tokenizer, sample_texts):
    assert tokenizer.encode_batch(sample_texts) == [tokenizer.encode(t) for t in sample_texts]


def test_bpe_compresses_training_text(tokenizer, sample_texts):
    tokens = sum(len(tokenizer.encode(t)) for t in sample_texts)
    assert tokens < 0.6 * sum(len(t.encode("utf-8")) for t in sample_texts)


def _cumulative(lengths):
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def test_jiebabpe_merges_stay_inside_jieba_words():
    text = "明月几时有？把酒问青天。大江东去，浪淘尽，千古风流人物。"
    tok = train_tokenizer("jiebabpe", [text] * 20, 600, None)  # enough merges to form whole words
    ids = tok.encode(text)
    # Byte-level BPE spells each byte as one character, so a token's length is its byte count.
    token_bounds = _cumulative(len(tok.backend.id_to_token(i)) for i in ids)
    word_bounds = _cumulative(len(w.encode("utf-8")) for w in split_words(text))
    assert set(word_bounds) <= set(token_bounds)
    assert max(len(tok.backend.id_to_token(i)) for i in ids) >= 6  # some tokens do span whole words


def test_save_load_round_trip(trained, kind, tmp_path):
    tok, directory = trained[kind]
    assert (directory / TOKENIZER_FILE).is_file() and (directory / META_FILE).is_file()
    meta = json.loads((directory / META_FILE).read_text())
    assert meta["kind"] == kind and meta["vocab_size"] == tok.vocab_size and meta["eod_token"] == EOD_TOKEN
    loaded = load_tokenizer(directory)
    assert loaded.kind == kind and loaded.vocab_size == tok.vocab_size and loaded.eod_id == tok.eod_id
    text = "明月几时有 def f(x):\n\treturn x  🙂"
    assert loaded.encode(text) == tok.encode(text)
    assert load_tokenizer(directory / TOKENIZER_FILE).encode(text) == tok.encode(text)


def test_training_is_deterministic(kind, tmp_path, sample_texts):
    a = train_tokenizer(kind, sample_texts * 5, 320, tmp_path / "a")
    b = train_tokenizer(kind, sample_texts * 5, 320, tmp_path / "b")
    assert (tmp_path / "a" / TOKENIZER_FILE).read_bytes() == (tmp_path / "b" / TOKENIZER_FILE).read_bytes()
    assert a.vocab_size == b.vocab_size


def test_trains_from_files(tmp_path, sample_texts):
    files = []
    for i, text in enumerate(sample_texts):
        files.append(tmp_path / f"{i}.txt")
        files[-1].write_text(text * 10, encoding="utf-8")
    tok = train_tokenizer("gpt2bpe", files, 300, None)
    assert tok.decode(tok.encode(sample_texts[0])) == sample_texts[0]


def test_gpt2_vocab_and_merges_pair(trained, tmp_path):
    tok = trained["gpt2bpe"][0]
    tok.backend.model.save(str(tmp_path))  # writes GPT-2 style vocab.json + merges.txt
    text = "The quick brown fox 🙂\n\tdef add(a, b):"
    for source in (tmp_path, tmp_path / "vocab.json", (tmp_path / "vocab.json", tmp_path / "merges.txt")):
        loaded = load_tokenizer(source)
        assert loaded.kind == "gpt2bpe"
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.decode(loaded.encode(text)) == text
        assert loaded.eod_id == tok.eod_id
    with pytest.raises(UsageError, match="gpt2bpe format"):
        load_tokenizer(tmp_path, "jiebabpe")


def test_gpt2_pair_without_eod_gets_one(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps({chr(c): i for i, c in enumerate(range(33, 127))}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tok = load_tokenizer(tmp_path)
    assert tok.eod_id == 94 and tok.vocab_size == 95


def test_hf_export_gives_the_same_ids_and_round_trips(trained, kind, tmp_path, sample_texts):
    from transformers import AutoTokenizer

    from launcher.data.tokenization_gpt_moe import GPTMoEJiebaTokenizer

    tok = trained[kind][0]
    tok.save_hf(tmp_path, model_max_length=64)
    # jiebabpe's class is code in the folder (trust_remote_code=True elsewhere); here, the same file imported
    reloaded = (GPTMoEJiebaTokenizer if kind == "jiebabpe" else AutoTokenizer).from_pretrained(tmp_path)
    assert (tmp_path / "tokenization_gpt_moe.py").is_file() == (kind == "jiebabpe")
    assert reloaded.eos_token_id == tok.eod_id and reloaded.pad_token_id == tok.pad_id
    assert reloaded.model_max_length == 64
    for text in sample_texts + ["\u4e00\U00020000\u9fa6㐀 rare Han characters 𠀀𠀁"]:
        ids = tok.encode(text)
        assert reloaded(text, add_special_tokens=False)["input_ids"] == ids  # jieba first, as in training
        assert reloaded.decode(ids) == text  # exact round trip
    batch = reloaded(sample_texts, add_special_tokens=False)["input_ids"]
    assert batch == [tok.encode(t) for t in sample_texts]


def test_kind_mismatch_is_refused(trained):
    with pytest.raises(UsageError, match="is jiebabpe, not gpt2bpe"):
        load_tokenizer(trained["jiebabpe"][1], "gpt2bpe")


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "not found"),
    (lambda d: d.mkdir(), "holds neither"),
    (lambda d: (d.mkdir(), (d / TOKENIZER_FILE).write_text("{not json")), "cannot read tokenizer"),
    (lambda d: (d.mkdir(), (d / TOKENIZER_FILE).write_text("{}"), (d / META_FILE).write_text("[")), "not valid JSON"),
    (lambda d: (d.mkdir(), (d / "vocab.json").write_text("{}")), "merges.txt"),
])
def test_bad_tokenizer_paths(tmp_path, setup, message):
    target = tmp_path / "tok"
    setup(target)
    with pytest.raises(UsageError, match=message):
        load_tokenizer(target)


def test_bad_training_input(tmp_path):
    with pytest.raises(UsageError, match="too small"):
        train_tokenizer("gpt2bpe", ["abc"], 100, None)
    with pytest.raises(UsageError, match="not one of"):
        train_tokenizer("sentencepiece", ["abc"], 1000, None)
    with pytest.raises(UsageError, match="no text"):
        train_tokenizer("jiebabpe", [], 1000, None)


def test_decode_rejects_ids_beyond_vocab(tokenizer):
    with pytest.raises(UsageError, match="outside"):
        tokenizer.decode([1, tokenizer.vocab_size])
    with pytest.raises(UsageError, match="outside"):
        tokenizer.decode([-1])


def test_wraps_a_plain_backend():
    from tokenizers import Tokenizer as Backend, models

    tok = Tokenizer(Backend(models.BPE()), "gpt2bpe")
    assert tok.decode([tok.eod_id]) == EOD_TOKEN
