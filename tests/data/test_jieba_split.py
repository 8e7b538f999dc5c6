"""jiebabpe's segmenters: the rjieba path gives jieba's words, and so the same ids, on any text.

The Chinese text is generated here (seeded): jieba dictionary words weighted toward the common
ones, free-standing characters (which jieba's HMM joins or not), rare Han characters outside
jieba's class, punctuation, Latin, digits and whitespace.
"""
import random
import re
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from launcher.data import jieba_split, pipeline
from launcher.data.jieba_split import JiebaSegmenter, get_segmenter
from launcher.data.tokenizer import load_tokenizer, train_tokenizer
from launcher.errors import UsageError

pytestmark = pytest.mark.skipif(not jieba_split.rjieba_available(), reason="no verified rjieba installed")

_WIDE_HAN_RUN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003ffff]+")
# Runs whose words jieba-rs's own HMM (its probabilities rounded to 6 decimals) gets wrong, and
# runs with characters outside jieba's Han class that jieba-rs would join to their neighbours.
_KNOWN_HARD = ["常在人寰", "珍重提携常在眼", "似花枝常在瓶", "晴雪半消花䰒䰄", "倒著接䍦花下", "𠀀中文𠀁字"]


@pytest.fixture(scope="module")
def reference():
    return JiebaSegmenter()


def reference_words(jieba_tokenizer, text):
    """jiebabpe's definition, independent of the code under test: jieba.cut on each run of Han characters."""
    words, pos = [], 0
    for match in _WIDE_HAN_RUN.finditer(text):
        if match.start() > pos:
            words.append(text[pos:match.start()])
        words.extend(jieba_tokenizer.cut(match.group(), HMM=True))
        pos = match.end()
    if pos < len(text):
        words.append(text[pos:])
    return words


def generated_texts(n: int, seed: int, mixed: bool = False) -> list[str]:
    import jieba

    rng = random.Random(seed)
    lines = Path(jieba.__file__).with_name("dict.txt").read_text("utf-8").splitlines()
    entries = [line.split(" ")[:2] for line in lines]
    entries.sort(key=lambda e: -int(e[1]))
    words = [w for w, _ in entries[:4000]] + rng.sample([w for w, _ in entries[4000:]], 4000)
    chars = [w for w in words if len(w) == 1] + [chr(rng.randint(0x4E00, 0x9FD5)) for _ in range(500)]
    rare = [chr(rng.choice([rng.randint(0x3400, 0x4DBF), rng.randint(0x9FD6, 0x9FFF), rng.randint(0x20000, 0x2A6DF),
                            rng.randint(0xF900, 0xFAFF)])) for _ in range(50)]
    punctuation = list("，。、；：？！“”《》（）\n") + ["。\n", "，\n\n"]
    latin = ["Python", " 3.11", " GPU", "abc", "x_1", " ", "  ", "\t", "2024年", "100%", "-", "..."]
    texts = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(5, 120)):
            r = rng.random()
            if r < 0.45:
                parts.append(rng.choice(words[:4000] if rng.random() < 0.7 else words))
            elif r < 0.75:
                parts.append(rng.choice(chars))
            elif r < 0.78:
                parts.append(rng.choice(rare))
            elif r < 0.92 or not mixed:
                parts.append(rng.choice(punctuation))
            else:
                parts.append(rng.choice(latin))
        texts.append("".join(parts))
    return texts


@pytest.fixture(scope="module")
def chinese():
    return generated_texts(400, seed=1) + _KNOWN_HARD


@pytest.fixture(scope="module")
def mixed():
    return generated_texts(300, seed=2, mixed=True) + _KNOWN_HARD


def test_rjieba_gives_jiebas_words(reference, chinese, mixed):
    fast = get_segmenter("rjieba")
    for texts in (chinese, mixed):
        expected = [reference_words(reference.jieba, t) for t in texts]
        assert fast.split_texts(texts) == expected
        assert [fast.split(t) for t in texts[:50]] == expected[:50]
        assert reference.split_texts(texts) == expected
    assert fast.split("常在人寰") == ["常", "在", "人", "寰"]  # jieba-rs's own HMM says 常在


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.one_of(st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF),
                                       st.characters(min_codepoint=0x3400, max_codepoint=0x4DBF),
                                       st.characters(min_codepoint=0x20000, max_codepoint=0x2A6DF),
                                       st.sampled_from(list("，。 a1\n\t🙂")), st.characters(codec="utf-8")),
                    max_size=60))
def test_rjieba_gives_jiebas_words_on_any_text(text):
    reference = get_segmenter("jieba")
    words = get_segmenter("rjieba").split(text)
    assert words == reference_words(reference.jieba, text)
    assert "".join(words) == text


def test_hmm_is_jiebas_bit_for_bit(reference):
    """Buffers of free-standing characters, incl. ones jieba's HMM has no probability for and near ties."""
    from jieba import finalseg

    rng = random.Random(3)
    common = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后"
    buffers = {"常在人寰", "常在人", "花下"}
    for _ in range(3000):
        length = rng.randint(2, 14)
        pool = common if rng.random() < 0.7 else None
        buffers.add("".join(rng.choice(pool) if pool else chr(rng.randint(0x4E00, 0x9FD5)) for _ in range(length)))
    got = get_segmenter("rjieba").hmm.cut(sorted(buffers))
    assert {b: got[b].split(" ") for b in buffers} == {b: list(finalseg.cut(b)) for b in buffers}


def test_rjieba_dictionary_is_jiebas(reference):
    """rjieba is given jieba's dictionary and total as jieba reads them (a word listed twice counts twice in
    the total); the route check `not FREQ.get(buffer)` is done with has_word: the same words, none of frequency 0."""
    frequencies, total = jieba_split._jieba_dictionary()
    freq = reference.jieba.FREQ
    assert total == reference.jieba.total >= sum(frequencies.values())  # 0.42.1 lists B超 twice: 3 more
    assert {w: f for w, f in frequencies.items() if f} == {w: f for w, f in freq.items() if f}
    rust = get_segmenter("rjieba").rust
    assert all(rust.has_word(w) == (f > 0) for w, f in freq.items())


@pytest.fixture(scope="module")
def zh_tokenizer(tmp_path_factory, chinese):
    """A jiebabpe tokenizer with enough merges to form whole words on the generated text."""
    directory = tmp_path_factory.mktemp("tok-zh")
    tok = train_tokenizer("jiebabpe", chinese[:200], 3000, directory)
    assert tok.vocab_size > 1500
    return directory


def _encode_with(monkeypatch, directory, segmenter, texts):
    monkeypatch.setenv(jieba_split.ENV_VAR, segmenter)
    return load_tokenizer(directory).encode_texts(texts)


def test_jiebabpe_ids_match_the_reference(monkeypatch, zh_tokenizer, chinese, mixed):
    texts = chinese + mixed + ["", "   ", "<|endoftext|>中文<|endoftext|>", "x" * 500 + "中文" * 200]
    expected = _encode_with(monkeypatch, zh_tokenizer, "jieba", texts)
    tok = load_tokenizer(zh_tokenizer)
    monkeypatch.setenv(jieba_split.ENV_VAR, "rjieba")
    assert tok.encode_texts(texts) == expected
    assert tok.encode_texts(texts) == expected  # again, from the memos
    assert [tok.encode(t) for t in texts[:40]] == expected[:40]
    assert tok.encode_batch(texts[:40]) == expected[:40]
    assert all(tok.decode(ids) == t for ids, t in zip(expected, texts))
    ref = get_segmenter("jieba")
    assert [tok.backend.encode(reference_words(ref.jieba, t), is_pretokenized=True, add_special_tokens=False).ids
            for t in texts] == expected


def test_memos_emptied_midway_change_nothing(monkeypatch, zh_tokenizer, chinese):
    from launcher.data import tokenizer as tokenizer_module

    expected = _encode_with(monkeypatch, zh_tokenizer, "jieba", chinese)
    monkeypatch.setattr(tokenizer_module._PieceEncoder, "MEMO_LIMIT", 50)
    monkeypatch.setattr(tokenizer_module._PieceEncoder, "MAX_MEMO_CHARS", 3)
    monkeypatch.setattr(jieba_split, "_MEMO_LIMIT", 20)
    monkeypatch.setitem(jieba_split._segmenters, "rjieba", jieba_split.RustSegmenter())
    monkeypatch.setenv(jieba_split.ENV_VAR, "rjieba")
    tok = load_tokenizer(zh_tokenizer)
    got = [ids for i in range(0, len(chinese), 7) for ids in tok.encode_texts(chinese[i:i + 7])]
    assert got == expected
    encoder = tok._piece_encoders["rjieba"]
    assert len(encoder.pieces) <= 50 + 7 * 200 and max(map(len, encoder.pieces)) <= 3


def test_training_is_the_same_with_either_segmenter(monkeypatch, tmp_path, mixed):
    files = []
    for segmenter in ("jieba", "rjieba"):
        monkeypatch.setenv(jieba_split.ENV_VAR, segmenter)
        train_tokenizer("jiebabpe", mixed[:100], 800, tmp_path / segmenter)
        files.append((tmp_path / segmenter / "tokenizer.json").read_bytes())
    assert files[0] == files[1]


def test_preprocessing_writes_the_same_data_with_either_segmenter(monkeypatch, tmp_path, zh_tokenizer, mixed):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(t.replace("\n", " ") for t in mixed), encoding="utf-8")
    outputs = []
    for segmenter, workers in (("jieba", 1), ("rjieba", 1), ("rjieba", 2)):
        monkeypatch.setenv(jieba_split.ENV_VAR, segmenter)
        prefix = tmp_path / f"{segmenter}-{workers}"
        result = pipeline.preprocess([corpus], prefix, tokenizer_path=zh_tokenizer, workers=workers, progress=False)
        assert result.documents == 1 and result.tokens > 1000
        outputs.append(Path(f"{prefix}.bin").read_bytes() + Path(f"{prefix}.idx").read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]


def test_auto_falls_back_to_jieba_and_bad_names_are_refused(monkeypatch, zh_tokenizer):
    monkeypatch.delenv(jieba_split.ENV_VAR, raising=False)
    assert jieba_split.resolve() == "rjieba"
    monkeypatch.setattr(jieba_split, "rjieba_available", lambda: False)
    assert jieba_split.resolve() == "jieba"
    assert isinstance(get_segmenter(), JiebaSegmenter)
    tok = load_tokenizer(zh_tokenizer)
    assert tok.decode(tok.encode("明月几时有")) == "明月几时有" and tok._piece_encoders == {}
    with pytest.raises(UsageError, match="no verified rjieba"):
        jieba_split.resolve("rjieba")
    monkeypatch.setenv(jieba_split.ENV_VAR, "pkuseg")
    with pytest.raises(UsageError, match="JIEBABPE_SEGMENTER='pkuseg' is not one of auto, rjieba, jieba"):
        jieba_split.resolve()


def test_bad_segmenter_is_one_line_exit_2_nothing_written(monkeypatch, tmp_path, capsys, zh_tokenizer):
    from launcher import preprocess as cli

    (tmp_path / "zh.txt").write_text("明月几时有", encoding="utf-8")
    monkeypatch.setenv(jieba_split.ENV_VAR, "pkuseg")
    for tokenizer in (["--tokenizer-type", "jiebabpe", "--vocab-size", "300"], ["--tokenizer", str(zh_tokenizer)]):
        before = sorted(tmp_path.rglob("*"))
        code = cli.main(["--input", str(tmp_path / "zh.txt"), "--output-prefix", str(tmp_path / "out" / "zh"),
                         *tokenizer])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "JIEBABPE_SEGMENTER='pkuseg' is not one of" in err, err
        assert sorted(tmp_path.rglob("*")) == before


def test_text_without_chinese_loads_no_dictionary(monkeypatch, zh_tokenizer):
    monkeypatch.setenv(jieba_split.ENV_VAR, "rjieba")
    monkeypatch.setattr(jieba_split, "_segmenters", {})
    tok = load_tokenizer(zh_tokenizer)
    assert tok.decode(tok.encode("def f(x):\n    return x  # 🙂")) == "def f(x):\n    return x  # 🙂"
    assert jieba_split._segmenters == {}
    assert tok.decode(tok.encode("明月几时有")) == "明月几时有" and list(jieba_split._segmenters) == ["rjieba"]
