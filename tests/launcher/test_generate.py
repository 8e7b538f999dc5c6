"""`python -m launcher.generate` and run_text_generation_gpt.sh: prompt files in, jsonl out, batching, seeds,
one-line errors. The checkpoint is written in DeepSpeed's layout from a nano model whose output depends on its
context (init std 0.3), so a batch or cache that mixed up rows or positions would change the text."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launcher.generate import main

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "megatron" / "run_text_generation_gpt.sh"
PROMPTS = ["def add(a, b):", "The quick brown", "x", "明月几时有？把酒问", "import os"]


@pytest.fixture(scope="module")
def checkpoint(nano_inference_run):
    """(run folder, model, tokenizer): the shared nano inference run (tests/conftest.py)."""
    return nano_inference_run


def greedy_alone(model, tokenizer, prompt: str, n: int) -> tuple[str, int, str]:
    """(text, tokens, finish reason) by recomputing every position, no cache, no batch, stop at end-of-document."""
    ids = torch.tensor([tokenizer.encode(prompt) if prompt else [tokenizer.eod_id]])
    new = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(ids).logits[0, -1].argmax())
            new.append(token)
            if token == tokenizer.eod_id:
                return tokenizer.decode(new[:-1]), len(new), "stop_token"
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokenizer.decode(new), n, "length"


def _run(*argv) -> int:
    return main([str(a) for a in argv])


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _write_prompts(tmp_path: Path, kind: str) -> Path:
    if kind == "txt":
        text = "".join(p + "\n" for p in PROMPTS) + "\n"  # a blank line is skipped
    elif kind == "tsv":
        text = "".join(p + "\tsome target\n" for p in PROMPTS)
    elif kind == "jsonl-prompt":
        text = "".join(json.dumps({"prompt": p, "id": i}, ensure_ascii=False) + "\n" for i, p in enumerate(PROMPTS))
    else:
        text = "".join(json.dumps({"text": p}) + "\n" for p in PROMPTS)
    path = tmp_path / f"prompts.{kind.split('-')[0]}"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("kind", ["txt", "tsv", "jsonl-prompt", "jsonl-text"])
def test_each_input_format_writes_the_expected_jsonl(checkpoint, tmp_path, kind):
    run, model, tokenizer = checkpoint
    out = tmp_path / "out" / "gen.jsonl"
    assert _run(run, "--input", _write_prompts(tmp_path, kind), "--output", out, "--temperature", "0",
                "--max-new-tokens", 12, "--batch-size", 3, "--threads", 1) == 0
    want = []
    for p in PROMPTS:
        text, tokens, reason = greedy_alone(model, tokenizer, p, 12)
        want.append({"prompt": p, "generation": text, "tokens": tokens, "finish_reason": reason})
    assert _records(out) == want
    assert len({r["generation"] for r in want}) == len(want)
    assert [p.name for p in out.parent.iterdir()] == ["gen.jsonl"]  # nothing else left behind


def test_batched_greedy_equals_one_at_a_time(checkpoint, tmp_path):
    run, _, _ = checkpoint
    prompts = _write_prompts(tmp_path, "jsonl-prompt")
    outs = []
    for batch in (1, 2, 5):
        out = tmp_path / f"b{batch}.jsonl"
        assert _run(run, "--input", prompts, "--output", out, "--temperature", "0", "--max-new-tokens", 20,
                    "--batch-size", batch, "--threads", 1) == 0
        outs.append(_records(out))
    assert outs[0] == outs[1] == outs[2]


def test_same_seed_same_text(checkpoint, tmp_path):
    run, _, _ = checkpoint
    prompts = _write_prompts(tmp_path, "txt")
    sampled = ["--temperature", "1.0", "--top-k", "50", "--top-p", "0.95", "--repetition-penalty", "1.1",
               "--max-new-tokens", 16, "--threads", 1]
    results = []
    for seed, batch in ((7, 5), (7, 2), (8, 5)):
        out = tmp_path / f"s{seed}-{batch}.jsonl"
        assert _run(run, "--input", prompts, "--output", out, "--seed", seed, "--batch-size", batch, *sampled) == 0
        results.append([r["generation"] for r in _records(out)])
    assert results[0] == results[1]  # same seed, other batches: same text
    assert results[0] != results[2]


def test_stop_string_and_prompt_mode(checkpoint, capsys):
    run, model, tokenizer = checkpoint
    full, _, _ = greedy_alone(model, tokenizer, PROMPTS[1], 12)
    stop = full[3:6]
    assert _run(run, "--prompt", PROMPTS[1], "--temperature", "0", "--max-new-tokens", 12, "--stop", stop,
                "--threads", 1) == 0
    assert capsys.readouterr().out == PROMPTS[1] + full[:full.index(stop)] + "\n"


def test_unconditional_samples_through_the_script(checkpoint, tmp_path):
    """The tutorial's 12 arguments: INPUT_FILE none writes BATCH_SIZE samples; TIME prints latency and tokens/s;
    OUTPUT_SEQ_LEN beyond the position table is cut, with one line saying so."""
    run, _, _ = checkpoint
    out = tmp_path / "samples.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(SCRIPT), str(run), "nano", "4", "1", "3", "64", "10", "32", "80", "none",
                           str(out), "time", "--seed", "3"], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    records = _records(out)
    assert len(records) == 3 and all(r["prompt"] == "" for r in records)
    assert all(r["tokens"] <= 63 for r in records) and len({r["generation"] for r in records}) == 3
    assert "# --max-new-tokens 80 cut to as few as 63 for 3 of 3 prompts" in proc.stderr
    assert "# threads: 1 (OMP_NUM_THREADS)" in proc.stderr
    assert "tokens/s" in proc.stderr and "latency per prompt" in proc.stderr


def _corrupt(run: Path, tmp_path: Path) -> Path:
    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    (bad / "checkpoints" / "iter_0000005" / "mp_rank_00_model_states.pt").write_bytes(b"not a checkpoint")
    return bad


def _without_an_expert(run: Path, tmp_path: Path) -> Path:
    bad = tmp_path / "partial"
    shutil.copytree(run, bad)
    (bad / "checkpoints" / "iter_0000005" / "layer_0_expert_3_mp_rank_00_model_states.pt").unlink()
    return bad


@pytest.mark.parametrize("case", ["temperature-nan", "top-p", "top-k", "penalty", "device-tpu", "device-cuda",
                                  "no-checkpoint", "corrupt", "missing-expert", "model-size", "moe", "seq-len", "bad-jsonl",
                                  "sp", "positional-count", "unknown-flag"])
def test_bad_input_is_one_line_and_exit_2(checkpoint, tmp_path, capsys, case):
    run, _, _ = checkpoint
    prompts = _write_prompts(tmp_path, "txt")
    out = tmp_path / "out.jsonl"
    positional = [run, "nano", "4", "1", "2", "64", "0", "32", "8", prompts, out, "none"]
    argv, message = {
        "temperature-nan": ([run, "--temperature", "nan"], "--temperature: got nan; allowed: 0 (greedy) or a number >= 0.001"),
        "top-p": ([run, "--top-p", "1.5"], "--top-p: got 1.5; allowed: a number in (0, 1]"),
        "top-k": ([run, "--top-k", "-3"], "--top-k: got -3; allowed: an integer >= 0"),
        "penalty": ([run, "--repetition-penalty", "inf"], "--repetition-penalty: got inf"),
        "device-tpu": ([run, "--device", "tpu"], "--device: got 'tpu'; allowed: cpu | cuda | cuda:N"),
        "device-cuda": ([run, "--device", "cuda"], "torch sees no CUDA device here"),
        "no-checkpoint": ([tmp_path / "nowhere"], "not found"),
        "corrupt": ([_corrupt(run, tmp_path)], "mp_rank_00_model_states.pt: not a whole checkpoint file"),
        "missing-expert": ([_without_an_expert(run, tmp_path)], "layer_0_expert_3_mp_rank_00_model_states.pt is missing"),
        "model-size": (["--positional", *positional[:1], "0.125B", *positional[2:]],
                       "MODEL_SIZE: got 0.125B (12 layers, hidden 768, 12 heads); the checkpoint is nano"),
        "moe": (["--positional", *positional[:2], "none", *positional[3:]], "MOE: got none; the checkpoint is MOE 4"),
        "seq-len": (["--positional", *positional[:5], "128", *positional[6:]], "SEQ_LEN (--seq-len): got 128"),
        "bad-jsonl": ([run, "--input", tmp_path / "p.jsonl"], "p.jsonl:2: no key 'prompt' or 'text'"),
        "sp": (["--positional", *positional[:3], "2", *positional[4:]], "SP: got '2'; allowed: 1"),
        "positional-count": (["--positional", *positional[:11]], "12 positional arguments needed"),
        "unknown-flag": ([run, "--temprature", "1"], "unrecognized arguments: --temprature"),
    }[case]
    if case == "device-cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is here")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"promt": "b"}\n')
    if argv[0] != "--positional":
        argv = [*argv, "--output", out, "--threads", "1"]
    capsys.readouterr()
    assert _run(*argv) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not out.exists()


def test_module_entry_point_runs(checkpoint):
    """`python -m launcher.generate` as a user types it (a fresh process: imports, stdout)."""
    run, model, tokenizer = checkpoint
    proc = subprocess.run([sys.executable, "-m", "launcher.generate", str(run), "--prompt", "x", "--temperature",
                           "0", "--max-new-tokens", "6"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "x" + greedy_alone(model, tokenizer, "x", 6)[0] + "\n"


def test_model_size_moe_and_rt_checks_name_what_differs(checkpoint):
    from launcher.errors import UsageError
    from launcher.inference import check_model_matches

    mcfg = checkpoint[1].config  # nano, MoE-4, top-2
    check_model_matches(mcfg, "nano", "4", "2")
    for args, message in ((("tiny", None, None), "MODEL_SIZE: got tiny"), ((None, "8", None), "MOE: got 8"),
                          ((None, "none", None), "MOE: got none; the checkpoint is MOE 4"),
                          ((None, None, "0"), "RT: got 0 (top-1 (Switch)); the checkpoint routes with top-2"),
                          ((None, None, "7"), "RT: got '7'; allowed: 0 (top-1)"), (("huge", None, None), "MODEL_SIZE")):
        with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
            check_model_matches(mcfg, *args)
