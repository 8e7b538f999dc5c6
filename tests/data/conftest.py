"""Small corpora and tiny trained tokenizers shared by the data tests (no ../shared, no network)."""
import pytest

from launcher.data.tokenizer import train_tokenizer

# A little of everything the tokenizers must round-trip: English, Chinese, code, emoji, tabs, space runs.
SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's 2024, isn't it?",
    "明月几时有？把酒问青天。不知天上宫阙，今夕是何年。我欲乘风归去，又恐琼楼玉宇，高处不胜寒。",
    "def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n    return a + b\n\n\nclass Point:\n    x: int = 0\n",
    "emoji 🙂🚀 and\ttabs\t\tand    runs of     spaces\r\nwindows line\n",
    "大江东去，浪淘尽，千古风流人物。故垒西边，人道是，三国周郎赤壁。Python 3 很好用。",
    "for i in range(10):\n\tprint(i, end=' ')  # 循环\n",
]
CORPUS = SAMPLE_TEXTS * 20
TINY_VOCAB = 400


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """{kind: (Tokenizer, saved directory)} trained once per session on CORPUS."""
    out = {}
    for kind in ("gpt2bpe", "jiebabpe"):
        directory = tmp_path_factory.mktemp(f"tok-{kind}")
        out[kind] = (train_tokenizer(kind, CORPUS, TINY_VOCAB, directory), directory)
    return out


@pytest.fixture(params=["gpt2bpe", "jiebabpe"])
def kind(request):
    return request.param


@pytest.fixture
def tokenizer(trained, kind):
    return trained[kind][0]


@pytest.fixture
def sample_texts():
    return list(SAMPLE_TEXTS)
