"""Preprocessing CLI: every input kind, workers, atomic output, and one clear line for each bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from launcher import preprocess as cli
from launcher.data import pipeline
from launcher.data.indexed import IndexedDataset
from launcher.data.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def _corpus(tmp_path, sample_texts):
    """Inputs of every kind, and the documents expected from them, in order."""
    src = tmp_path / "src"
    (src / "folder" / "sub").mkdir(parents=True)
    (src / "folder" / "b.txt").write_text(sample_texts[1], encoding="utf-8")
    (src / "folder" / "sub" / "c.py").write_text(sample_texts[2], encoding="utf-8")
    (src / "folder" / "empty.txt").write_text("")  # skipped inside folders
    (src / "folder" / ".hidden").write_text("not read")
    (src / "folder" / "__pycache__").mkdir()
    (src / "folder" / "__pycache__" / "c.cpython-311.pyc").write_bytes(b"\xff\xfe compiled")  # not read
    (src / "a.txt").write_text(sample_texts[0], encoding="utf-8")
    (src / "d.jsonl").write_text(
        json.dumps({"text": sample_texts[3], "id": 1}) + "\n\n" + json.dumps({"text": sample_texts[4]}) + "\n",
        encoding="utf-8")
    (src / "e.tsv").write_text("浣溪沙·晏殊\t一曲新词酒一杯\nq\ta\tb\n", encoding="utf-8")
    inputs = [src / "a.txt", src / "folder", src / "d.jsonl", src / "e.tsv"]
    expected = [sample_texts[0], sample_texts[1], sample_texts[2], sample_texts[3], sample_texts[4],
                "浣溪沙·晏殊\t一曲新词酒一杯", "q\ta\tb"]
    return [str(p) for p in inputs], expected


def _run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _listing(path):
    return sorted(str(p.relative_to(path)) for p in Path(path).rglob("*"))


def test_every_input_kind_round_trips(tmp_path, capsys, sample_texts, kind):
    inputs, expected = _corpus(tmp_path, sample_texts)
    prefix = tmp_path / "out" / "corpus"
    code, out, err = _run(["--input", *inputs, "--output-prefix", prefix, "--tokenizer-type", kind,
                           "--vocab-size", 300, "--workers", 1], capsys)
    assert code == 0, err
    assert "wrote" in out and "tokens/s" in out
    tok = load_tokenizer(tmp_path / "out" / "tokenizer")
    assert tok.kind == kind
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.uint16 and len(ds) == len(expected)
    for i, text in enumerate(expected):
        ids = ds[i].tolist()
        assert ids[-1] == tok.eod_id and tok.eod_id not in ids[:-1]
        assert tok.decode(ids[:-1]) == text
    assert sorted(os.listdir(tmp_path / "out")) == ["corpus.bin", "corpus.idx", "tokenizer"]


def test_workers_do_not_change_the_output(tmp_path, capsys, sample_texts, kind, trained):
    inputs, _ = _corpus(tmp_path, sample_texts)
    tok_dir = trained[kind][1]
    outputs = []
    for workers in (1, 2):
        prefix = tmp_path / f"w{workers}"
        assert _run(["--input", *inputs, "--output-prefix", prefix, "--tokenizer", tok_dir,
                     "--workers", workers], capsys)[0] == 0
        outputs.append([Path(f"{prefix}{ext}").read_bytes() for ext in (".bin", ".idx")])
    assert outputs[0] == outputs[1]


def test_no_append_eod_and_megatron_spellings(tmp_path, capsys, sample_texts, trained):
    inputs, expected = _corpus(tmp_path, sample_texts)
    tok, tok_dir = trained["gpt2bpe"]
    tok.backend.model.save(str(tmp_path))  # GPT-2 style vocab.json + merges.txt
    prefix = tmp_path / "m"
    code, _, err = _run(["--input", inputs[2], "--output-prefix", prefix, "--vocab-file", tmp_path / "vocab.json",
                         "--merge-file", tmp_path / "merges.txt", "--tokenizer-type", "GPT2BPETokenizer",
                         "--json-keys", "text", "--dataset-impl", "mmap", "--no-append-eod", "--workers", 1],
                        capsys)
    assert code == 0, err
    ds = IndexedDataset(prefix)
    assert [tok.decode(ds[i]) for i in range(len(ds))] == [expected[3], expected[4]]


def test_progress_bar_shows_rates(tmp_path, sample_texts, trained):
    inputs, _ = _corpus(tmp_path, sample_texts)
    proc = subprocess.run(
        [sys.executable, "-m", "launcher.preprocess", "--input", *inputs, "--output-prefix", tmp_path / "p",
         "--tokenizer", trained["gpt2bpe"][1], "--workers", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "B/s" in proc.stderr and "tokens/s" in proc.stderr
    assert IndexedDataset(tmp_path / "p").num_tokens > 0


def test_rerun_reuses_the_tokenizer_and_refuses_to_overwrite_another(tmp_path, capsys, sample_texts):
    inputs, _ = _corpus(tmp_path, sample_texts)
    argv = ["--input", *inputs, "--output-prefix", tmp_path / "o" / "x", "--vocab-size", 300, "--workers", 1]
    assert _run(argv, capsys)[0] == 0
    tok_json = tmp_path / "o" / "tokenizer" / "tokenizer.json"
    stamp = tok_json.stat().st_mtime_ns
    assert _run(argv, capsys)[0] == 0
    assert tok_json.stat().st_mtime_ns == stamp  # reused, not retrained
    code, _, err = _run(["--input", inputs[0], "--output-prefix", tmp_path / "o" / "y", "--vocab-size", 300], capsys)
    assert code == 2 and "already holds a tokenizer" in err
    assert not (tmp_path / "o" / "y.bin").exists()


def test_a_crash_leaves_nothing_behind(tmp_path, capsys, sample_texts, monkeypatch):
    inputs, _ = _corpus(tmp_path, sample_texts)
    calls = []

    def crash(self, texts):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("worker died")
        return real(self, texts)
    real = pipeline._ChunkEncoder.__call__
    monkeypatch.setattr(pipeline._ChunkEncoder, "__call__", crash)
    monkeypatch.setattr(pipeline, "_chunks", lambda docs: ([d] for d in docs))  # a chunk per document
    before = _listing(tmp_path)
    with pytest.raises(RuntimeError):
        cli.main(["--input", *inputs, "--output-prefix", str(tmp_path / "out" / "x"), "--vocab-size", "300",
                  "--workers", "1"])
    assert len(calls) == 2
    assert _listing(tmp_path) == before  # no .bin/.idx, no temporaries, no tokenizer, no folder


def test_data_is_not_left_without_its_tokenizer(tmp_path, capsys, sample_texts, monkeypatch):
    """The tokenizer is put in place after the data; if that fails, the data goes too."""
    inputs, _ = _corpus(tmp_path, sample_texts)
    real_rename = os.rename

    def rename(src, dst):
        if Path(dst).name == "tokenizer":
            raise OSError("disk full")
        return real_rename(src, dst)
    monkeypatch.setattr(pipeline.os, "rename", rename)
    before = _listing(tmp_path)
    with pytest.raises(OSError, match="disk full"):
        cli.main(["--input", *inputs, "--output-prefix", str(tmp_path / "out" / "x"), "--vocab-size", "300",
                  "--workers", "1"])
    assert _listing(tmp_path) == before


def _bad_cases(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("some text\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n\n{"text": "b"\n')
    (tmp_path / "nokey.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    (tmp_path / "notstr.jsonl").write_text('{"text": "a"}\n{"text": 5}\n')
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    out = ["--output-prefix", tmp_path / "out" / "x"]
    train = ["--vocab-size", "300"]
    return [
        (["--input", tmp_path / "missing.txt", *out, *train], "input not found"),
        (["--input", tmp_path / "empty.txt", *out, *train], "is empty"),
        (["--input", tmp_path / "emptydir", *out, *train], "holds no non-empty files"),
        (["--input", tmp_path / "bad.jsonl", *out, *train], "bad.jsonl:3: not valid JSON"),
        (["--input", tmp_path / "nokey.jsonl", *out, *train], "nokey.jsonl:2: no key 'text'"),
        (["--input", tmp_path / "good.txt", tmp_path / "notstr.jsonl", *out, *train], "notstr.jsonl:2: 'text' is a int"),
        (["--input", tmp_path / "latin1.txt", *out, *train], "latin1.txt is not UTF-8"),
        (["--input", good, *out], "either --tokenizer"),
        (["--input", good, *out, *train, "--tokenizer", tmp_path], "not both"),
        (["--input", good, *out, "--vocab-size", "100"], "too small"),
        (["--input", good, *out, *train, "--tokenizer-type", "bert"], "not one of"),
        (["--input", good, "--output-prefix", tmp_path, *train], "not a folder"),
        (["--input", good, *out, *train, "--workers", "0"], "--workers: got 0; allowed: 1 to"),
        (["--input", good, *out, "--tokenizer", tmp_path / "nowhere"], "tokenizer not found"),
        (["--input", good, *out, *train, "--dataset-impl", "lazy"], "only mmap"),
        (["--input", good, *out, "--bogus"], "unrecognized arguments"),
        (["--input", good, *out, "--vocab-size", "many"], "invalid int value"),
        ([*out, *train], "--input is required"),
        (["--stdlib"], "--stdlib needs --output-dir"),
    ]


def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys):
    for argv, message in _bad_cases(tmp_path):
        before = _listing(tmp_path)
        code, out, err = _run(argv, capsys)
        assert code == 2, (argv, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (argv, err)
        assert _listing(tmp_path) == before, argv


def test_bad_input_from_the_shell(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\nnot json\n')
    proc = subprocess.run([sys.executable, "-m", "launcher.preprocess", "--input", tmp_path / "bad.jsonl",
                           "--output-prefix", tmp_path / "o" / "x", "--vocab-size", "300"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == f"error: {tmp_path / 'bad.jsonl'}:2: not valid JSON (Expecting value)\n"
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]


def test_example_script(tmp_path, sample_texts):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(sample_texts * 3), encoding="utf-8")
    proc = subprocess.run(["bash", ROOT / "examples" / "megatron" / "run_preprocess.sh", corpus,
                           tmp_path / "data" / "demo", "jiebabpe", "300"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr
    ds = IndexedDataset(tmp_path / "data" / "demo")
    assert len(ds) == 1 and load_tokenizer(tmp_path / "data" / "tokenizer").kind == "jiebabpe"


def test_a_killed_runs_tokenizer_staging_is_removed(tmp_path, capsys, sample_texts):
    """A preprocess killed while saving its new tokenizer leaves <folder>.tmp-<host>-<pid>; the next run on
    this host removes it once that process is gone (another host's, or a live one's, stays)."""
    import socket

    (tmp_path / "in.txt").write_text("\n".join(sample_texts) * 5, encoding="utf-8")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [tmp_path / "out" / f"tokenizer.tmp-{socket.gethostname()}-{dead.pid}", tmp_path / "out" / f"tokenizer.tmp-{dead.pid}"]
    kept = [tmp_path / "out" / f"tokenizer.tmp-{socket.gethostname()}-{os.getpid()}x",
            tmp_path / "out" / f"tokenizer.tmp-other-host-{dead.pid}",
            tmp_path / "out" / f"tokenizer.tmp-{socket.gethostname()}-{os.getppid()}"]
    for folder in stale + kept:
        folder.mkdir(parents=True)
        (folder / "tokenizer.json").write_text("{}")
    code, _, err = _run(["--input", tmp_path / "in.txt", "--output-prefix", tmp_path / "out" / "x",
                         "--vocab-size", 300, "--workers", 1, "--quiet"], capsys)
    assert code == 0, err
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)
