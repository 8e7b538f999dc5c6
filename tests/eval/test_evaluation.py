"""Evaluation: metrics on hand-made examples (a model that is right, a uniform one), length normalisation,
batching, held-out loss, task files, the project's stdlib tasks, and lm-eval on a nano model."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from launcher.errors import UsageError
from launcher.evaluation import evaluate_model
from launcher.evaluation.scoring import rolling_windows, score_continuations, window_losses
from launcher.evaluation.tasks import (choice_credit, choice_metrics, encode_pair, evaluate_task, load_task)
from model import GPTMoE, GPTMoEConfig

COMPLETION = [
    {"context": "the cat sat on the", "target": " mat"},
    {"context": "def add(a, b):\n    return a +", "target": " b"},
    {"context": "", "target": "import os"},
    {"context": "x = [1, 2, 3]\nprint(len(", "target": "x))"},
]
TOO_LONG = {"context": "a", "target": " " + "z" * 70}  # longer than any model's context here: left out
# Byte-level tokens (no merges), so equal-length choices have equal token counts: a uniform model ties.
CHOICE = [
    {"context": "colour of the sky:", "choices": [" blue", " gray", " pink"], "label": 0},
    {"context": "2 + 2 =", "choices": [" 4", " 5"], "label": 0},
    {"context": "for i in", "choices": [" range(3):", " ranges(3)", " rang(3)::"], "label": 0},
    {"context": "opposite of hot:", "choices": [" warm", " cold", " heat", " cool"], "label": 1},
]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def byte_tokenizer():
    """A byte-level BPE with no merges: one token per byte, plus the end-of-document token."""
    from launcher.data.tokenizer import train_tokenizer

    return train_tokenizer("gpt2bpe", ["abc def"], 257)


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    return _write(folder / "complete.jsonl", COMPLETION + [TOO_LONG]), _write(folder / "choose.jsonl", CHOICE)


class Oracle:
    """Knows the right continuation: after a prefix of one of `sequences` it puts a logit of 30 on the token
    that follows (0 elsewhere); elsewhere, uniform."""

    def __init__(self, sequences, vocab_size):
        self.vocab_size = vocab_size
        self.next = {tuple(s[:i]): s[i] for s in sequences for i in range(1, len(s))}

    def __call__(self, input_ids):
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        for b, row in enumerate(input_ids.tolist()):
            for t in range(len(row)):
                following = self.next.get(tuple(row[:t + 1]))
                if following is not None:
                    logits[b, t, following] = 30.0
        return logits


def uniform(vocab_size):
    return lambda input_ids: torch.zeros(*input_ids.shape, vocab_size)


def _right_sequences(tokenizer, rows):
    sequences = []
    for row in rows:
        gold = row["target"] if "target" in row else row["choices"][row["label"]]
        context, continuation = encode_pair(tokenizer, row["context"], gold)
        sequences.append(context + continuation)
    return sequences


def test_a_right_model_scores_one_and_a_uniform_one_scores_chance(byte_tokenizer, task_files):
    vocab = byte_tokenizer.vocab_size
    completion, choice = load_task(task_files[0]), load_task(task_files[1])
    oracle = Oracle(_right_sequences(byte_tokenizer, COMPLETION + CHOICE), vocab)
    right = evaluate_task(oracle, byte_tokenizer, completion, 64, vocab)
    assert right["acc"] == 1.0 and right["examples"] == 4 and right["left_out"] == 1
    assert -1e-3 < right["target_loglikelihood"] <= 0 and right["perplexity"] == pytest.approx(1.0, abs=1e-3)
    right = evaluate_task(oracle, byte_tokenizer, choice, 64, vocab)
    assert right["acc"] == right["acc_norm"] == right["acc_per_token"] == 1.0

    flat = evaluate_task(uniform(vocab), byte_tokenizer, completion, 64, vocab)
    tokens = [len(encode_pair(byte_tokenizer, r["context"], r["target"])[1]) for r in COMPLETION]
    assert flat["acc"] == pytest.approx(np.mean([vocab ** -n for n in tokens]), rel=1e-9) == flat["chance"]
    assert flat["loss_per_token"] == pytest.approx(math.log(vocab))
    flat = evaluate_task(uniform(vocab), byte_tokenizer, choice, 64, vocab)
    chance = np.mean([1 / len(r["choices"]) for r in CHOICE])
    assert flat["chance"] == pytest.approx(chance)
    assert flat["acc"] == flat["acc_norm"] == flat["acc_per_token"] == pytest.approx(chance)


def test_length_normalisation():
    # A long right choice against a short wrong one: the raw sum prefers the short one.
    long_right = choice_metrics([[-4.0, -3.0]], [[4, 1]], [["abcdefgh", "x"]], [0])
    assert (long_right["acc"], long_right["acc_norm"], long_right["acc_per_token"]) == (0.0, 1.0, 1.0)
    # Per character and per token disagree when characters per token differ between the choices.
    split = choice_metrics([[-6.0, -4.0]], [[6, 2]], [["abcdef", "abcdefgh"]], [0])
    assert (split["acc"], split["acc_norm"], split["acc_per_token"]) == (0.0, 0.0, 1.0)
    split = choice_metrics([[-6.0, -4.0]], [[6, 2]], [["abcdef", "abcdefgh"]], [1])
    assert (split["acc"], split["acc_norm"], split["acc_per_token"]) == (1.0, 1.0, 0.0)
    assert choice_credit([-1.0, -1.0, -2.0], 1) == 0.5 and choice_credit([-1.0, -1.0, -2.0], 2) == 0.0


def test_encode_pair_moves_trailing_space_and_prefixes_empty_context(byte_tokenizer):
    context, continuation = encode_pair(byte_tokenizer, "a b ", "c")
    assert byte_tokenizer.decode(context) == "a b" and byte_tokenizer.decode(continuation) == " c"
    assert encode_pair(byte_tokenizer, "", "x")[0] == [byte_tokenizer.eod_id]


@pytest.fixture(scope="module")
def nano_model(byte_tokenizer):
    config = GPTMoEConfig.from_size("nano", vocab_size=byte_tokenizer.vocab_size, seq_len=48, num_experts=4)
    torch.manual_seed(0)
    return GPTMoE(config).eval()


def test_batching_and_padding_change_no_score(nano_model, byte_tokenizer):
    requests = [encode_pair(byte_tokenizer, r["context"], c) for r in CHOICE for c in r["choices"]]
    requests.append((list(range(40, 100)), [5, 6]))  # longer than seq_len: loses context from the left
    one = score_continuations(nano_model, requests, 48, batch_size=1)
    many = score_continuations(nano_model, requests, 48, batch_size=5, pad_id=7)
    for a, b in zip(one, many):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4) and a.greedy == b.greedy
    # The truncated request is scored on its last 48 tokens.
    alone = score_continuations(nano_model, [(list(range(52, 100)), [5, 6])], 48)[0]
    assert alone.logprob == pytest.approx(one[-1].logprob, abs=1e-4)
    with pytest.raises(ValueError, match="continuation"):
        score_continuations(nano_model, [([1], [])], 48)


def test_rolling_windows_predict_every_token_once():
    tokens = list(range(100, 123))  # 23 tokens: 22 predictions
    windows = rolling_windows(tokens, 8)
    predicted = [t for inputs, labels in windows for t in labels if t != -100]
    assert predicted == tokens[1:]
    for inputs, labels in windows:
        assert len(inputs) == len(labels) <= 8
        start = tokens.index(inputs[0])
        assert all(lab in (-100, tokens[start + i + 1]) for i, lab in enumerate(labels))
    assert len(windows[-1][0]) == 8  # the last window takes as much context as fits


def test_text_loss_is_the_models_loss_on_each_document(nano_model, byte_tokenizer, tmp_path):
    docs = ["short one", "x" * 70]  # the second spans two windows of 48
    data = tmp_path / "held.jsonl"
    _write(data, [{"text": d} for d in docs])
    result = evaluate_model(nano_model, byte_tokenizer, data=[[str(data)]], batch_size=3)["validation"]["held.jsonl"]
    eod = byte_tokenizer.eod_id
    total, count = 0.0, 0
    for doc in docs:
        windows = rolling_windows([eod, *byte_tokenizer.encode(doc), eod], 48)
        nll, n = window_losses(nano_model, windows, batch_size=1)
        total, count = total + nll, count + n
    assert result["tokens"] == count == sum(len(d) + 1 for d in docs)
    assert result["loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(total / math.log(2) / sum(map(len, docs)), rel=1e-5)
    # The first document alone, in one forward pass.
    ids = torch.tensor([[eod, *byte_tokenizer.encode(docs[0]), eod]])
    with torch.no_grad():
        direct = nano_model(ids[:, :-1], labels=ids[:, 1:]).loss
    first = evaluate_model(nano_model, byte_tokenizer, data=[[str(data)]], limit=1)["validation"]["held.jsonl"]
    assert first["loss"] == pytest.approx(float(direct), rel=1e-5)


def test_indexed_validation_loss(nano_model, byte_tokenizer, tmp_path):
    from launcher.data.gpt_dataset import build_gpt_datasets
    from launcher.data.indexed import IndexedDatasetWriter

    prefix = tmp_path / "docs"
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for _ in range(60):
            writer.add_document(rng.integers(0, 256, int(rng.integers(5, 60))).tolist() + [byte_tokenizer.eod_id])
    result = evaluate_model(nano_model, byte_tokenizer, data=[str(prefix)], split="80,20,0", limit=6)
    valid = result["validation"]["docs/valid"]
    samples = build_gpt_datasets(str(prefix), "80,20,0", 48, 999, (1, 6, 0))[1]  # any seed: the same samples
    batch = torch.from_numpy(np.stack([samples[i] for i in range(6)]))
    with torch.no_grad():
        direct = nano_model(batch[:, :-1], labels=batch[:, 1:]).loss
    assert valid["sequences"] == 6 and valid["tokens"] == 6 * 48
    assert valid["loss"] == pytest.approx(float(direct), rel=1e-5)
    assert valid["perplexity"] == pytest.approx(math.exp(float(direct)), rel=1e-5)


@pytest.mark.parametrize("line, message", [
    ("not json", "not valid JSON"),
    ('{"context": "a"}', "needs a non-empty string \"target\""),
    ('{"context": "a", "choices": ["x"], "label": 0}', "2 or more"),
    ('{"context": "a", "choices": ["x", "y"], "label": 2}', "label"),
    ('{"context": "a", "choices": ["x", "y"], "label": true}', "label"),
    ('[1, 2]', "JSON object"),
])
def test_bad_task_files_are_named_with_their_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"context": "a", "target": " b"}\n' + line + "\n")
    with pytest.raises(UsageError, match=f"bad.jsonl:2: .*{message}"):
        load_task(path)


def test_one_kind_per_task_file(tmp_path):
    path = _write(tmp_path / "mixed.jsonl", [COMPLETION[0], CHOICE[0]])
    with pytest.raises(UsageError, match="mixed.jsonl:2: a multiple_choice example in a completion task"):
        load_task(path)


def test_stdlib_tasks_come_from_held_out_files_deterministically(tmp_path):
    from launcher.data.gpt_dataset import parse_split, split_documents
    from launcher.data.stdlib_corpus import stdlib_files, stdlib_root
    from launcher.evaluation.stdlib_tasks import validation_files, write_stdlib_tasks

    paths = write_stdlib_tasks(tmp_path / "a", count=60)
    again = write_stdlib_tasks(tmp_path / "b", count=60)
    assert all(paths[n].read_bytes() == again[n].read_bytes() for n in paths)
    files = stdlib_files()
    train = {files[i].relative_to(stdlib_root()).as_posix()
             for i in split_documents(len(files), parse_split("98,2,0"))[0]}
    held_out = {p.relative_to(stdlib_root()).as_posix() for p in validation_files()}
    for name, path in paths.items():
        task = load_task(path)
        sources = {e["source"].rsplit(":", 1)[0] for e in task.examples}
        assert len(task.examples) == 60 and sources <= held_out and not sources & train
        assert len(sources) > 5  # spread over the held-out files
        assert (tmp_path / "a" / "lm_eval" / f"{name}.yaml").is_file()
    identifier = load_task(paths["stdlib_last_identifier"])
    for example in identifier.examples:
        name = example["target"].strip()
        assert name.isidentifier() and name in example["context"] and not example["context"][-1:].isspace()
    modified = paths["stdlib_next_line"].stat().st_mtime_ns
    write_stdlib_tasks(tmp_path / "a", count=60)  # up to date: reused
    assert paths["stdlib_next_line"].stat().st_mtime_ns == modified


def _memorise(model, sequences, steps=80):
    """Train `model` until it predicts each of `sequences` (a model known to be right on them)."""
    width = max(map(len, sequences))
    batch = torch.zeros(len(sequences), width, dtype=torch.long)
    labels = torch.full((len(sequences), width), -100, dtype=torch.long)
    for i, s in enumerate(sequences):
        batch[i, :len(s)] = torch.tensor(s)
        labels[i, :len(s) - 1] = torch.tensor(s[1:])
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(batch, labels=labels).loss.backward()
        optimizer.step()
    return model.eval()


def test_lm_eval_on_a_nano_model_agrees_with_our_scores(byte_tokenizer, task_files, tmp_path, monkeypatch):
    from launcher.evaluation.harness import OFFLINE_ENV, run_lm_eval

    for key in OFFLINE_ENV:
        monkeypatch.setenv(key, "0")  # the run must switch them on; restored after the test
    config = GPTMoEConfig.from_size("nano", vocab_size=byte_tokenizer.vocab_size, seq_len=48, num_experts=4)
    torch.manual_seed(0)
    model = _memorise(GPTMoE(config), _right_sequences(byte_tokenizer, COMPLETION[:2] + CHOICE[:2]))
    ours = evaluate_model(model, byte_tokenizer, tasks=[str(p) for p in task_files], batch_size=4)["tasks"]
    # A task folder of the user's own, in lm-eval's terms, beside ours.
    folder = tmp_path / "mine"
    folder.mkdir()
    _write(folder / "qa.jsonl", [{"question": "2 + 2", "good": " 4", "bad": " 5"}] * 3)
    (folder / "mine.yaml").write_text(
        f"task: mine\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'qa.jsonl'}\n"
        f"  cache_dir: {tmp_path / 'datasets'}\n"  # not ~/.cache
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: 'Q: {{question}}'\n"
        "doc_to_choice: '{{[good, bad]}}'\ndoc_to_target: 0\nmetric_list:\n  - metric: acc\n")
    theirs = run_lm_eval(model, byte_tokenizer, task_files, include_path=folder, task_names=["mine"], batch_size=4)
    assert theirs["mine"]["examples"] == 3 and 0 <= theirs["mine"]["acc"] <= 1
    with pytest.raises(UsageError, match="nope not found"):
        run_lm_eval(model, byte_tokenizer, include_path=folder, task_names=["nope"])
    assert theirs["complete"]["examples"] == ours["complete"]["examples"] == 4  # the same one left out
    assert theirs["choose"]["examples"] == 4
    assert theirs["complete"]["acc"] == pytest.approx(ours["complete"]["acc"])
    assert theirs["complete"]["perplexity"] == pytest.approx(ours["complete"]["perplexity"], rel=1e-4)
    for metric in ("acc", "acc_norm"):
        assert theirs["choose"][metric] == pytest.approx(ours["choose"][metric])
    assert ours["complete"]["acc"] >= 0.5 and ours["choose"]["acc"] >= 0.5  # the memorised examples are right
    assert all(os.environ.get(k) == v for k, v in OFFLINE_ENV.items())
