"""Batched decoding (model.generation): per-row settings, left padding, requests joining a running batch,
stop conditions, seeds; checked on weights for which context matters (init std 0.3), against decoding
each prompt alone and against recomputing every position without a cache."""
import pytest
import torch

from model.generation import Decoder, Request, SamplingParams, penalize, warp

from .conftest import build, nano

GREEDY = SamplingParams(max_new_tokens=10, temperature=0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build(nano(router_type="top2", init_std=0.3, seq_len=48)).eval()


def _prompts(n=4, lengths=(3, 9, 5, 1, 7)):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 97, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


def _without_cache(model, prompt, n):
    """Greedy by recomputing the whole sequence each step: no cache, no padding, no batch."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, len(prompt):].tolist()


def test_context_matters(model):
    prompts = torch.tensor([p[-3:] for p in _prompts(4, (3, 4, 5, 6))])
    with torch.no_grad():
        whole = model(prompts).logits[:, -1].argmax(-1)
        last_only = model(prompts[:, -1:]).logits[:, -1].argmax(-1)
    assert (whole != last_only).any()


def test_batched_greedy_equals_each_prompt_alone_and_no_cache(model):
    prompts = _prompts(5)
    batched = Decoder(model).run([Request(p, GREEDY) for p in prompts])
    for prompt, done in zip(prompts, batched):
        alone = Decoder(model).run([Request(prompt, GREEDY)])[0]
        assert done.token_ids == alone.token_ids == _without_cache(model, prompt, 10)
        assert done.finish_reason == "length" and done.prompt_ids == prompt
    assert len({tuple(d.token_ids) for d in batched}) > 1


def test_requests_joining_a_running_batch_decode_as_alone(model):
    a, b, c = _prompts(3, (2, 11, 6))
    decoder = Decoder(model)
    decoder.add(Request(a, GREEDY, key="a"))
    streamed = {"a": [], "b": [], "c": []}
    step = 0
    while decoder.has_work():
        if step == 3:
            decoder.add(Request(b, SamplingParams(max_new_tokens=4, temperature=0), key="b"))
            decoder.add(Request(c, GREEDY, key="c"))
        for u in decoder.step():
            streamed[u.key].append(u.token)
        if step == 3:
            assert len(decoder.rows) == 3 and decoder.cache.keys[0].shape[0] == 3
        if step == 7:  # b stopped after its 4 tokens: it left the batch and its cache rows went with it
            assert [r.request.key for r in decoder.rows] == ["a", "c"] and decoder.cache.keys[0].shape[0] == 2
        step += 1
    assert step == 13  # c joined at step 3 and took 10 steps
    done = {d.key: d for d in decoder.results()}
    assert streamed["a"] == done["a"].token_ids == _without_cache(model, a, 10)
    assert streamed["b"] == done["b"].token_ids == _without_cache(model, b, 4)
    assert streamed["c"] == done["c"].token_ids == _without_cache(model, c, 10)


def test_cancelled_request_leaves_the_batch_and_the_others_go_on(model):
    a, b, c = _prompts(3, (4, 8, 2))
    decoder = Decoder(model)
    for key, prompt in zip("abc", (a, b, c)):
        decoder.add(Request(prompt, GREEDY, key=key))
    decoder.add(Request(a, GREEDY, key="never started"))
    assert decoder.cancel("never started") and not decoder.cancel("unknown")
    for _ in range(3):
        decoder.step()
    assert decoder.cancel("b")
    assert [r.request.key for r in decoder.rows] == ["a", "c"] and decoder.cache.keys[0].shape[0] == 2
    while decoder.has_work():
        decoder.step()
    done = {d.key: d for d in decoder.results()}
    assert set(done) == {"a", "b", "c"}
    assert done["b"].finish_reason == "cancelled" and done["b"].token_ids == _without_cache(model, b, 3)
    assert done["a"].token_ids == _without_cache(model, a, 10) and done["c"].token_ids == _without_cache(model, c, 10)


def test_same_seed_same_text_and_independent_of_batch_mates(model):
    prompts = _prompts(3)
    params = [SamplingParams(max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.95, seed=i) for i in range(3)]
    first = Decoder(model).run([Request(p, q) for p, q in zip(prompts, params)])
    again = Decoder(model).run([Request(p, q) for p, q in zip(prompts, params)])
    alone = [Decoder(model).run([Request(p, q)])[0] for p, q in zip(prompts, params)]
    assert [d.token_ids for d in first] == [d.token_ids for d in again] == [d.token_ids for d in alone]
    other = Decoder(model).run([Request(prompts[0], SamplingParams(max_new_tokens=12, temperature=1.0, seed=99))])
    assert other[0].token_ids != first[0].token_ids


def test_per_row_settings_in_one_batch(model):
    prompt = _prompts(1)[0]
    rows = [GREEDY, SamplingParams(max_new_tokens=10, temperature=1.5, seed=3),
            SamplingParams(max_new_tokens=10, temperature=0.7, top_k=1, seed=4),  # top-k 1 is greedy
            SamplingParams(max_new_tokens=10, temperature=2.0, top_p=1e-6, seed=5)]  # so is a tiny top-p
    out = Decoder(model).run([Request(prompt, p) for p in rows])
    greedy = _without_cache(model, prompt, 10)
    assert out[0].token_ids == out[2].token_ids == out[3].token_ids == greedy
    assert out[1].token_ids != greedy


def test_stop_token_stop_string_and_text(model):
    prompt = _prompts(1)[0]
    greedy = _without_cache(model, prompt, 10)

    def decode(ids):
        return "".join(f"<{i}>" for i in ids)

    eos = greedy[4]
    first_eos = greedy.index(eos)
    by_token = Decoder(model, decode).run([Request(prompt, SamplingParams(10, temperature=0, stop_token_ids=(eos,)))])
    assert by_token[0].token_ids == greedy[:first_eos + 1] and by_token[0].finish_reason == "stop_token"
    assert by_token[0].text(decode) == decode(greedy[:first_eos])
    stop = decode(greedy[2:4])
    at = decode(greedy).index(stop)
    by_string = Decoder(model, decode).run([Request(prompt, SamplingParams(10, temperature=0, stop_strings=("zz", stop)))])
    done = by_string[0]
    assert done.finish_reason == "stop_string" and done.text(decode) == decode(greedy)[:at]
    assert decode(done.token_ids).endswith(stop)  # it stopped on the token that completed the stop string


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(3, 50)
    seen = torch.zeros(3, 50, dtype=torch.bool)
    history = torch.randint(0, 50, (3, 8))
    seen.scatter_(1, history, True)
    for p in (1.3, 0.7):
        want = RepetitionPenaltyLogitsProcessor(p)(history, logits.clone())
        torch.testing.assert_close(penalize(logits, torch.full((3,), p), seen), want)
    mixed = penalize(logits, torch.tensor([1.0, 1.3, 0.7]), seen)
    torch.testing.assert_close(mixed[0], logits[0])


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.9), (7, 0.6), (0, 1.0)])
def test_temperature_top_k_top_p_match_transformers(top_k, top_p):
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(4, 64) * 3
    want = TemperatureLogitsWarper(0.8)(None, logits.clone())
    if top_k:
        want = TopKLogitsWarper(top_k)(None, want)
    if top_p < 1:
        want = TopPLogitsWarper(top_p)(None, want)
    values, candidates = warp(logits, torch.full((4,), 0.8), torch.full((4,), top_k), torch.full((4,), top_p))
    got = torch.full_like(logits, float("-inf"))
    got.scatter_(1, candidates, values) if candidates is not None else got.copy_(values)
    torch.testing.assert_close(got.softmax(-1), want.softmax(-1))


def test_rows_with_and_without_top_k_are_each_filtered_as_alone():
    """A batch of a top-k row and a row without it (top-p off in both): each row's distribution is the one
    it gets alone, so batching never turns a row's top-k off."""
    logits = torch.randn(2, 64) * 3
    top_k, temperature, top_p = torch.tensor([5, 0]), torch.full((2,), 0.8), torch.ones(2)

    def probs(values, candidates):
        full = torch.full((values.shape[0], 64), float("-inf"))
        full.scatter_(1, candidates, values) if candidates is not None else full.copy_(values)
        return full.softmax(-1)

    both = probs(*warp(logits, temperature, top_k, top_p))
    for i in range(2):
        alone = probs(*warp(logits[i:i + 1], temperature[i:i + 1], top_k[i:i + 1], top_p[i:i + 1]))
        torch.testing.assert_close(both[i:i + 1], alone)
    assert int((both[0] > 0).sum()) == 5 and int((both[1] > 0).sum()) == 64


def test_bad_requests_are_one_line_errors(model):
    decoder = Decoder(model)
    with pytest.raises(ValueError, match="max_new_tokens: got 46; allowed: at most 45"):
        decoder.add(Request([1, 2, 3], SamplingParams(max_new_tokens=46)))
    with pytest.raises(ValueError, match="prompt_ids"):
        decoder.add(Request([], GREEDY))
    with pytest.raises(ValueError, match="prompt_ids"):
        decoder.add(Request([97], GREEDY))
    with pytest.raises(ValueError, match="stop_strings need"):
        decoder.add(Request([1], SamplingParams(max_new_tokens=4, stop_strings=("x",))))
    for bad in (dict(temperature=float("nan")), dict(temperature=-1), dict(top_p=0), dict(top_p=1.5),
                dict(top_k=-1), dict(repetition_penalty=0), dict(repetition_penalty=float("inf")),
                dict(max_new_tokens=0), dict(stop_strings=("",)),
                # logits / 1e-50 or * 1e6 overflow float32 into NaN probabilities, failing the whole batch
                dict(temperature=1e-50), dict(repetition_penalty=1e-6), dict(repetition_penalty=1e6)):
        with pytest.raises(ValueError, match=f"{next(iter(bad))}: got"):
            SamplingParams(**bad)
    assert not decoder.has_work()


def test_repetition_penalty_in_a_padded_batch_counts_only_real_tokens(model):
    """The padding id (0 here) also appears in a prompt: its seen flag must survive the padding around it."""
    prompts = [[0, 5, 0, 7], [3, 1, 4, 1, 5, 9, 2, 6], [0], [8, 8, 8, 8, 8, 8, 0]]
    params = SamplingParams(max_new_tokens=8, temperature=0, repetition_penalty=3.0)
    batched = Decoder(model, pad_id=0).run([Request(p, params) for p in prompts])
    for prompt, done in zip(prompts, batched):
        assert done.token_ids == Decoder(model).run([Request(prompt, params)])[0].token_ids
    plain = Decoder(model).run([Request(p, GREEDY) for p in prompts])
    assert any(d.token_ids != q.token_ids[:8] for d, q in zip(batched, plain))
