"""Fine-tuning dataset: loss mask on target tokens only, padding, packing, truncation, bad files."""
import json
import logging

import pytest
import torch

from launcher.data.sft import IGNORE_INDEX, SFTDataset
from launcher.errors import UsageError
from model import shift_labels

PAIRS = [("浣溪沙·晏殊", "一曲新词酒一杯，去年天气旧亭台。"), ("Q: 2+2?", "A: 4"), ("", "only a target")]


def _tsv(tmp_path, pairs=PAIRS, name="d.tsv"):
    path = tmp_path / name
    path.write_text("".join(f"{p}\t{t}\n" for p, t in pairs), encoding="utf-8")
    return path


def _jsonl(tmp_path, pairs=PAIRS, name="d.jsonl", keys=("prompt", "target")):
    path = tmp_path / name
    path.write_text("".join(json.dumps({keys[0]: p, keys[1]: t}, ensure_ascii=False) + "\n" for p, t in pairs),
                    encoding="utf-8")
    return path


def _expected(tok, prompt, target):
    ids = tok.encode(prompt) + tok.encode(target) + [tok.eod_id]
    return ids, len(tok.encode(prompt))


def test_labels_cover_exactly_the_target(tokenizer, tmp_path):
    ds = SFTDataset(_tsv(tmp_path), tokenizer, seq_len=64)
    assert len(ds) == 3 and ds.num_truncated == 0
    for i, (prompt, target) in enumerate(PAIRS):
        item = ds[i]
        ids, n_prompt = _expected(tokenizer, prompt, target)
        x, y = item["input_ids"], item["labels"]
        assert x.dtype == torch.long and y.dtype == torch.long and x.shape == y.shape == (64,)
        assert x[:len(ids)].tolist() == ids
        assert (x[len(ids):] == tokenizer.pad_id).all()
        for t in range(64):
            # labels[t] is input_ids[t] where that token is a target token (and not the example's first).
            is_target = max(n_prompt, 1) <= t < len(ids)
            assert y[t].item() == (ids[t] if is_target else IGNORE_INDEX), (i, t)
        assert y[y != IGNORE_INDEX].tolist() == ids[max(n_prompt, 1):]


def test_jsonl_with_custom_keys(tokenizer, tmp_path):
    tsv = SFTDataset(_tsv(tmp_path), tokenizer, seq_len=48)
    js = SFTDataset(_jsonl(tmp_path, keys=("q", "a")), tokenizer, seq_len=48, prompt_key="q", target_key="a")
    for i in range(len(PAIRS)):
        assert torch.equal(tsv[i]["input_ids"], js[i]["input_ids"]) and torch.equal(tsv[i]["labels"], js[i]["labels"])


def test_loss_is_only_on_target_tokens(tokenizer, tmp_path):
    ds = SFTDataset(_tsv(tmp_path), tokenizer, seq_len=64)
    item = ds[0]
    logits = torch.zeros(1, 64, tokenizer.vocab_size, requires_grad=True)
    torch.nn.functional.cross_entropy(logits[0], shift_labels(item["labels"][None])[0]).backward()
    ids, n_prompt = _expected(tokenizer, *PAIRS[0])
    has_grad = logits.grad[0].abs().sum(-1) > 0
    # The positions that predict target tokens: from the last prompt token to the one before the eod.
    assert has_grad.nonzero().flatten().tolist() == list(range(n_prompt - 1, len(ids) - 1))


@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
def test_wrapper_loss_on_a_batch_is_the_target_tokens_loss(tokenizer, tmp_path, pack):
    """One batch of items through GPTMoEForCausalLM (labels as they come) has the loss computed by hand
    from the (prompt, target) pairs: mean over target tokens of -log p(token | everything before it in its
    window); GPTMoE directly, with shift_labels, has the same loss."""
    from model import GPTMoE, GPTMoEConfig, GPTMoEForCausalLM

    ds = SFTDataset(_tsv(tmp_path, PAIRS * 2), tokenizer, seq_len=64, pack=pack)
    batch = {k: torch.stack([ds[i][k] for i in range(len(ds))]) for k in ("input_ids", "labels")}
    torch.manual_seed(0)
    model = GPTMoE(GPTMoEConfig.from_size("nano", vocab_size=tokenizer.vocab_size, seq_len=64, num_experts=4,
                                          init_std=0.3)).eval()
    hf = GPTMoEForCausalLM.from_gpt_moe(model).eval()
    with torch.no_grad():
        out = hf(**batch)
        logp = model(batch["input_ids"]).logits.float().log_softmax(-1)  # (B, T, V)
        direct = model(batch["input_ids"], labels=shift_labels(batch["labels"])).loss
    by_hand = []
    for row, window in enumerate(ds._windows):
        pos = 0
        for j in window:
            ids, n_prompt = _expected(tokenizer, *(PAIRS * 2)[j])
            for k in range(max(n_prompt, 1), len(ids)):  # target tokens, the eod included
                by_hand.append(-logp[row, pos + k - 1, ids[k]])
            pos += len(ids)
    want = torch.stack(by_hand).mean()
    torch.testing.assert_close(out.lm_loss, want)
    torch.testing.assert_close(direct, want)
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss + out.z_loss)


def test_packing(tokenizer, tmp_path):
    pairs = PAIRS * 4
    packed = SFTDataset(_tsv(tmp_path, pairs), tokenizer, seq_len=96, pack=True)
    single = SFTDataset(_tsv(tmp_path, pairs, "e.tsv"), tokenizer, seq_len=96)
    assert len(packed) < len(single)
    lengths = [len(ids) for ids, _ in packed.examples]
    # Whole examples in order, each window within seq_len tokens.
    flat = [j for w in packed._windows for j in w]
    assert flat == list(range(len(pairs)))
    assert all(sum(lengths[j] for j in w) <= 96 for w in packed._windows)
    # The same target tokens are learned, packed or not.
    def targets(ds):
        return sorted(v for i in range(len(ds)) for v in ds[i]["labels"].tolist() if v != IGNORE_INDEX)
    assert targets(packed) == targets(single)
    # The first token of a following example is never a label (it is not predicted from the previous one).
    item, first = packed[0], packed._windows[0]
    pos = lengths[first[0]]
    assert item["labels"][pos].item() == IGNORE_INDEX
    assert item["input_ids"][pos - 1].item() == item["labels"][pos - 1].item() == tokenizer.eod_id


def test_truncation_counts_and_warns(tokenizer, tmp_path, caplog):
    long_pairs = [("短", "长" * 200), ("x" * 300, "target"), ("ok", "fine")]
    with caplog.at_level(logging.WARNING, logger="launcher.data.sft"):
        ds = SFTDataset(_tsv(tmp_path, long_pairs), tokenizer, seq_len=32)
    assert ds.num_truncated == 2
    assert "2 of 3 examples" in caplog.text and "truncated" in caplog.text
    for i in range(3):
        labels = ds[i]["labels"]
        assert (labels != IGNORE_INDEX).sum() > 0  # every example keeps target tokens to learn from
        assert len(ds.examples[i][0]) <= 32
    # A long target keeps its start after the whole prompt; a long prompt keeps its end before the whole target.
    ids, n_prompt = ds.examples[0]
    prompt, target = tokenizer.encode("短"), tokenizer.encode("长" * 200) + [tokenizer.eod_id]
    assert ids.tolist() == prompt + target[:32 - len(prompt)] and n_prompt == len(prompt)
    ids, n_prompt = ds.examples[1]
    prompt, target = tokenizer.encode("x" * 300), tokenizer.encode("target") + [tokenizer.eod_id]
    assert ids.tolist() == prompt[-(32 - len(target)):] + target and n_prompt == 32 - len(target)


@pytest.mark.parametrize("name, content, message", [
    ("a.tsv", "prompt without a tab\n", "a.tsv:1: no tab"),
    ("a.tsv", "p\tt\n\xff\n", "a.tsv:2: not UTF-8"),
    ("a.tsv", "\n\n", "holds no examples"),
    ("a.jsonl", '{"prompt": "p", "target": "t"}\n{broken\n', "a.jsonl:2: not valid JSON"),
    ("a.jsonl", '{"prompt": "p"}\n', "a.jsonl:1: no key 'target'"),
    ("a.jsonl", '{"prompt": "p", "target": 3}\n', "'target' is a int, not a string"),
    ("a.jsonl", '[1, 2]\n', "not an object"),
    ("a.csv", "p,t\n", "is a .tsv"),
])
def test_bad_files(tokenizer, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8").replace(b"\xc3\xbf", b"\xff"))
    with pytest.raises(UsageError, match=message):
        SFTDataset(path, tokenizer, seq_len=16)


def test_missing_file(tokenizer, tmp_path):
    with pytest.raises(UsageError, match="not found"):
        SFTDataset(tmp_path / "nope.tsv", tokenizer, seq_len=16)
