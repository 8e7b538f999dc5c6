"""The bad-input table: launcher, preprocess, generate and evaluate, each case one clear line and nothing written.

Every case asserts: the exit code, at most 3 lines on stderr, no traceback, and that the sandbox (data, outputs,
the folders a run would write) is byte for byte what it was. Cases run in process through the entry points'
main() (a few milliseconds each); only what needs another process gets one (a live job holding a run folder, a
native abort that would take the test process down). `TRIED`/`CLEAN` count them for the report:
`pytest tests/launcher/test_bad_input.py -q -s` prints the tally.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SEQ_LEN", "DATA_PATH",
                "TRAIN_TOKENS", "WARMUP_TOKENS", "GLOBAL_BATCH_SIZE", "EP_SIZE", "PRECISION", "LOAD", "OFFLOAD",
                "SLURM_NNODES", "SLURM_NODEID", "SLURM_JOB_NODELIST", "OUTPUT_BASEPATH")
NANO = "run 1 gpt2bpe nano 8 0 2 1 none none 100"
TALLY = {"tried": 0, "clean": 0}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """data/: a tiny dataset and its tokenizer, data made with a larger vocabulary, a truncated dataset."""
    from launcher.data.indexed import IndexedDatasetWriter
    from launcher.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("bad-input")
    data = root / "data"
    texts = ["def f(x):\n    return x + 1\n", "The quick brown fox jumps over the lazy dog.\n"] * 30
    tok = train_tokenizer("gpt2bpe", texts, 300, out_dir=data / "tokenizer")
    with IndexedDatasetWriter(data / "text", vocab_size=tok.vocab_size) as w:
        for t in texts:
            w.add_document(tok.encode(t) + [tok.eod_id])
    with IndexedDatasetWriter(data / "foreign", vocab_size=5000) as w:  # ids of another tokenizer
        for i in range(40):
            w.add_document([7, 4000 + i, 12])
    (data / "foreign_tokenizer").symlink_to(data / "tokenizer", target_is_directory=True)
    for ext in (".bin", ".idx"):
        (data / f"cut{ext}").write_bytes((data / f"text{ext}").read_bytes()[:-6])
    (root / "a-file").write_text("not a folder\n")
    (root / "corpus.txt").write_text("hello world\n" * 50)
    return root


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.is_dir(), None if p.is_dir() else p.read_bytes())
            for p in sorted(root.rglob("*"))}


# ---------------------------------------------------------------------------- the cases
# (id, tool, argv, env, setup, exit code, text the one line must hold)
# tool: launcher | preprocess | generate | evaluate; argv "{d}" = the sandbox's data folder, "{s}" = the sandbox.
L = "launcher"
P = "preprocess"
G = "generate"
E = "evaluate"


def pos(index: int, value: str) -> str:
    args = NANO.split()
    args[index] = value
    return " ".join(args)


DATA = " --tokenizer-path {d}/tokenizer"  # with DATA_PATH={d}/text: the run's model is known before it starts
CASES = [
    # positional arguments
    ("mode", L, pos(0, "train"), {}, None, 2, "MODE: got 'train'"),
    ("gpus-zero", L, pos(1, "0"), {}, None, 2, "GPUS_PER_NODE: got '0'"),
    ("gpus-word", L, pos(1, "two"), {}, None, 2, "GPUS_PER_NODE: got 'two'"),
    ("tokenizer", L, pos(2, "sentencepiece"), {}, None, 2, "TOKENIZER: got 'sentencepiece'"),
    ("size", L, pos(3, "7B"), {}, None, 2, "MODEL_SIZE: got '7B'"),
    ("moe-zero", L, pos(4, "0"), {}, None, 2, "MOE: got '0'"),
    ("moe-word", L, pos(4, "eight"), {}, None, 2, "MOE: got 'eight'"),
    ("router", L, pos(5, "3"), {}, None, 2, "RT: got '3'"),
    ("batch", L, pos(6, "0"), {}, None, 2, "BATCH_SIZE: got '0'"),
    ("sp", L, pos(7, "3"), {}, None, 2, "SP: got 3"),
    ("ac", L, pos(8, "selective"), {}, None, 2, "AC: got 'selective'"),
    ("zero3", L, pos(9, "z3"), {}, None, 2, "ZERO: stage 3 is not supported"),
    ("zero-word", L, pos(9, "z4"), {}, None, 2, "ZERO: got 'z4'"),
    ("save-interval", L, pos(10, "0"), {}, None, 2, "SAVE_INTERVAL: got '0'"),
    ("too-few", L, "run 1 gpt2bpe nano", {}, None, 2, "expected 11 positional arguments"),
    # environment
    ("ep-size", L, NANO, {"EP_SIZE": "3"}, None, 2, "EP_SIZE: got 3"),
    ("global-batch", L, NANO, {"GLOBAL_BATCH_SIZE": "7"}, None, 2, "GLOBAL_BATCH_SIZE: got 7"),
    ("precision", L, NANO, {"PRECISION": "fp8"}, None, 2, "PRECISION: got 'fp8'"),
    ("offload", L, NANO, {"OFFLOAD": "nvme"}, None, 2, "OFFLOAD: got 'nvme'"),
    ("offload-no-zero", L, NANO, {"OFFLOAD": "cpu"}, None, 2, "OFFLOAD: cpu needs ZeRO"),
    ("train-tokens", L, NANO, {"TRAIN_TOKENS": "10"}, None, 2, "TRAIN_TOKENS: got 10"),
    ("node-rank", L, NANO, {"WORLD_SIZE": "2", "RANK": "2"}, None, 2, "RANK (node rank): got 2"),
    ("port-word", L, NANO, {"MASTER_PORT": "http"}, None, 2, "MASTER_PORT: got 'http'"),
    ("port-range", L, NANO, {"MASTER_PORT": "70000"}, None, 2, "MASTER_PORT: got 70000"),
    ("seq-len", L, NANO, {"SEQ_LEN": "long"}, None, 2, "SEQ_LEN: got 'long'"),
    # flags
    ("lr-inf", L, NANO + " --lr inf", {}, None, 2, "--lr: got inf; allowed: a finite number"),
    ("lr-nan", L, NANO + " --lr nan", {}, None, 2, "--lr: got nan"),
    ("lr-negative", L, NANO + " --lr -1", {}, None, 2, "--lr/--min-lr: got -1.0"),
    ("min-lr-above-lr", L, NANO + " --lr 1e-4 --min-lr 1e-3", {}, None, 2, "--lr/--min-lr"),
    ("capacity-inf", L, NANO + " --capacity-factor inf", {}, None, 2, "--capacity-factor: got inf"),
    ("dropout", L, NANO + " --dropout 1.5", {}, None, 2, "--dropout: got 1.5"),
    ("beta2", L, NANO + " --adam-beta2 1", {}, None, 2, "--adam-beta2: got 1.0"),
    ("weight-decay", L, NANO + " --weight-decay -1", {}, None, 2, "--weight-decay: got -1.0"),
    ("clip-nan", L, NANO + " --clip-grad nan", {}, None, 2, "--clip-grad: got nan"),
    ("aux-coef", L, NANO + " --aux-loss-coef -0.1", {}, None, 2, "--aux-loss-coef: got -0.1"),
    ("seed", L, NANO + " --seed -1", {}, None, 2, "--seed: got -1"),
    ("vocab-small", L, NANO + " --vocab-size 5", {}, None, 2, "--vocab-size: got 5"),
    ("vocab-absurd", L, NANO + " --vocab-size 99999999999999", {}, None, 2, "--vocab-size: got 99999999999999"),
    ("device-tpu", L, NANO + " --device tpu", {}, None, 2, "--device: got 'tpu'"),
    ("device-memory-zero", L, NANO + " --device-memory-gib 0", {}, None, 2, "--device-memory-gib: got 0.0"),
    ("device-memory-inf", L, NANO + " --device-memory-gib inf", {}, None, 2, "--device-memory-gib: got inf"),
    ("rendezvous-timeout", L, NANO + " --rendezvous-timeout 0", {}, None, 2, "--rendezvous-timeout: got 0.0"),
    ("unknown-flag", L, NANO + " --learning-rate 1", {}, None, 2, "flags: unknown --learning-rate"),
    ("flag-no-value", L, NANO + " --lr", {}, None, 2, "--lr: missing its value"),
    ("run-name", L, NANO + " --run-name ../../etc", {}, None, 2, "--run-name: got '../../etc'"),
    ("split", L, NANO + " --split 0,100,0", {}, None, 2, "--split: got '0,100,0'"),
    ("moe-interval", L, NANO + " --moe-interval 5", {}, None, 2, "--moe-interval: got 5"),
    # files a run reads
    ("data-missing", L, NANO, {"DATA_PATH": "{d}/nowhere"}, None, 2, "nowhere.idx not found"),
    ("data-truncated", L, NANO, {"DATA_PATH": "{d}/cut"}, "tokenizer-beside-cut", 2, "is truncated or corrupt"),
    ("data-no-tokenizer", L, NANO + " --tokenizer-path {d}/none", {"DATA_PATH": "{d}/text"}, None, 2,
     "tokenizer not found"),
    ("data-beyond-vocab", L, NANO + " --tokenizer-path {d}/tokenizer", {"DATA_PATH": "{d}/foreign"}, None, 2,
     "holds token id"),
    ("load-missing", L, NANO, {"LOAD": "{s}/old-run"}, None, 2, "LOAD: got"),
    ("load-garbage", L, NANO, {"LOAD": "{s}/loads/garbage"}, "load:garbage", 2, "LOAD: got"),
    ("load-bad-state", L, NANO + DATA, {"LOAD": "{s}/loads/bad-state", "DATA_PATH": "{d}/text"}, "load:bad-state", 2,
     "trainer_state.json: not readable JSON"),
    ("load-other-experts", L, NANO + DATA, {"LOAD": "{s}/loads/other-experts", "DATA_PATH": "{d}/text"}, "load:other-experts", 2,
     "its model differs from this run's: experts_per_moe_layer"),
    ("load-truncated", L, NANO + DATA, {"LOAD": "{s}/loads/truncated", "DATA_PATH": "{d}/text"}, "load:truncated", 2,
     "has 100 bytes, 4096 were written"),
    ("load-random-bytes", L, NANO + DATA, {"LOAD": "{s}/loads/random-bytes", "DATA_PATH": "{d}/text"}, "load:random-bytes", 2,
     "mp_rank_00_model_states.pt: not a whole checkpoint file"),
    ("hostfile-missing", L, NANO + " --hostfile {s}/hosts", {}, None, 2, "--hostfile:"),
    # outputs
    ("output-under-file", L, NANO, {"OUTPUT_BASEPATH": "{s}/a-file/runs"}, None, 2, "is a file"),
    ("output-unwritable", L, NANO, {"OUTPUT_BASEPATH": "/proc/runs"}, None, 2, "cannot be written"),
    ("dryrun-output-unwritable", L, pos(0, "dryrun"), {"OUTPUT_BASEPATH": "/proc/runs"}, None, 2,
     "cannot be written"),
    # the machine (run mode)
    ("device-cuda-absent", L, NANO + " --device cuda", {}, "no-cuda", 2, "--device: got 'cuda'"),
    ("fp16-on-cpu", L, NANO, {"PRECISION": "fp16"}, None, 2, "PRECISION: got 'fp16' on CPU"),
    ("port-busy", L, NANO, {"MASTER_PORT": "{port}"}, "busy-port", 2, "is in use on this machine"),
    ("does-not-fit", L, "run 1 gpt2bpe 13B 8 0 1 1 full none 100", {"GLOBAL_BATCH_SIZE": "8"}, None, 2,
     "--ignore-memory-check"),
    ("does-not-fit-2", L, "run 2 gpt2bpe 6.7B none 0 1 1 full none 100", {"GLOBAL_BATCH_SIZE": "8"}, None, 2,
     "memory: this run needs"),
    ("run-folder-busy", L, NANO + " --run-name busy", {}, "live-job", 2, "a job is running in this run folder"),
    ("rendezvous-alone", L, NANO + " --rendezvous-timeout 1", {"WORLD_SIZE": "2", "RANK": "0",
                                                              "MASTER_PORT": "{port}", "GLOBAL_BATCH_SIZE": "8"},
     None, 2, "nodes 1 of 2 did not join"),
    # preprocess
    (P + "-no-input", P, "--output-prefix {s}/pp/x --vocab-size 300", {}, None, 2, "--input is required"),
    (P + "-no-prefix", P, "--input {s}/corpus.txt --vocab-size 300", {}, None, 2, "--output-prefix is required"),
    (P + "-both", P, "--input {s}/corpus.txt --output-prefix {s}/pp/x --vocab-size 300 --tokenizer {d}/tokenizer",
     {}, None, 2, "not both"),
    (P + "-neither", P, "--input {s}/corpus.txt --output-prefix {s}/pp/x", {}, None, 2, "not neither"),
    (P + "-vocab-small", P, "--input {s}/corpus.txt --output-prefix {s}/pp/x --vocab-size 5", {}, None, 2,
     "too small"),
    (P + "-vocab-absurd", P, "--input {s}/corpus.txt --output-prefix {s}/pp/x --vocab-size 99999999999999", {},
     "subprocess", 2, "--vocab-size: got 99,999,999,999,999"),
    (P + "-input-missing", P, "--input {s}/nothing.txt --output-prefix {s}/pp/x --vocab-size 300", {}, None, 2,
     "input not found"),
    (P + "-prefix-under-file", P, "--input {s}/corpus.txt --output-prefix {s}/a-file/x --vocab-size 300", {}, None,
     2, "is a file"),
    (P + "-prefix-unwritable", P, "--input {s}/corpus.txt --output-prefix /proc/pp/x --vocab-size 300", {}, None, 2,
     "cannot be written"),
    (P + "-prefix-folder", P, "--input {s}/corpus.txt --output-prefix {d} --vocab-size 300", {}, None, 2,
     "not a folder"),
    (P + "-workers-zero", P, "--input {s}/corpus.txt --output-prefix {s}/pp/x --vocab-size 300 --workers 0", {},
     None, 2, "--workers: got 0"),
    (P + "-workers-many", P, "--input {s}/corpus.txt --output-prefix {s}/pp/x --vocab-size 300 --workers 65", {},
     "one-core", 2, "--workers: got 65"),
    (P + "-type", P, "--input {s}/corpus.txt --output-prefix {s}/pp/x --vocab-size 300 --tokenizer-type spm", {},
     None, 2, "tokenizer type 'spm'"),
    (P + "-tokenizer-missing", P, "--input {s}/corpus.txt --output-prefix {s}/pp/x --tokenizer {s}/none", {}, None,
     2, "tokenizer not found"),
    (P + "-dataset-impl", P, "--input {s}/corpus.txt --output-prefix {s}/pp/x --vocab-size 300 --dataset-impl lazy",
     {}, None, 2, "only mmap"),
    (P + "-stdlib-no-dir", P, "--stdlib", {}, None, 2, "--stdlib needs --output-dir"),
    (P + "-stdlib-unwritable", P, "--stdlib --output-dir /proc/corpus", {}, None, 2, "cannot be written"),
    (P + "-merge-alone", P, "--input {s}/corpus.txt --output-prefix {s}/pp/x --merge-file {s}/m.txt", {}, None, 2,
     "--merge-file needs --vocab-file"),
    (P + "-unknown", P, "--input {s}/corpus.txt --frobnicate", {}, None, 2, "unrecognized arguments"),
    # generate (its own checks; only what needs no trained checkpoint)
    ("generate-missing", G, "{s}/no-run --prompt x", {}, None, 2, "no-run"),
    ("generate-garbage", G, "{s}/garbage --prompt x", {}, "garbage-checkpoint", 2, "garbage"),
    ("generate-max-new-tokens", G, "{s}/no-run --max-new-tokens 0", {}, None, 2, "--max-new-tokens"),
    ("generate-top-p", G, "{s}/no-run --top-p 2", {}, None, 2, "--top-p"),
    ("generate-temperature", G, "{s}/no-run --temperature -1", {}, None, 2, "--temperature"),
    ("generate-temperature-tiny", G, "{s}/no-run --temperature 1e-50", {}, None, 2, "--temperature: got 1e-50"),
    ("generate-top-k", G, "{s}/no-run --top-k -3", {}, None, 2, "--top-k"),
    # evaluate (the same: what needs no trained checkpoint)
    ("evaluate-missing", E, "{s}/no-run", {}, None, 2, "no complete checkpoint"),
    ("evaluate-garbage", E, "{s}/garbage", {}, "garbage-checkpoint", 2, "no complete checkpoint"),
    ("evaluate-device-tpu", E, "{s}/no-run --device tpu", {}, None, 2, "--device: got 'tpu'"),
    ("evaluate-device-cuda-absent", E, "{s}/no-run --device cuda", {}, "no-cuda", 2, "no CUDA device"),
    ("evaluate-batch-size", E, "{s}/no-run --batch-size 0", {}, None, 2, "--batch-size: got 0"),
    ("evaluate-limit", E, "{s}/no-run --limit -1", {}, None, 2, "--limit: got -1"),
    ("evaluate-threads", E, "{s}/no-run --threads 0 --tasks stdlib", {}, None, 2, "--threads: got 0"),
    ("evaluate-data-split", E, "{s}/no-run --data-split dev", {}, None, 2, "--data-split"),
    ("evaluate-unknown", E, "{s}/no-run --metric ppl", {}, None, 2, "unrecognized arguments"),
]


# ---------------------------------------------------------------------------- setups
def _live_job(sandbox: Path, out: Path):
    run = out / "busy"
    code = textwrap.dedent(f"""
        import fcntl, json, os, socket, time
        os.makedirs({str(run)!r}, exist_ok=True)
        fd = os.open({str(run / '.job-node0.lock')!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, json.dumps({{"pid": os.getpid(), "host": socket.gethostname()}}).encode())
        print("held", flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return lambda: (proc.kill(), proc.wait())


def _damaged_checkpoint(sandbox: Path, kind: str, argv: list[str]) -> None:
    """sandbox/loads/KIND: a checkpoint tag folder of the run `argv` would start, damaged as KIND says (only
    what the launcher reads before anything is written; no tensor needed)."""
    from launcher.cli import resolve_settings
    from launcher.config import RunConfig
    from launcher.data.tokenizer import load_tokenizer

    tag = sandbox / "loads" / kind
    if tag.exists():
        return
    tag.mkdir(parents=True)
    if kind == "garbage":
        (tag / "latest").write_bytes(os.urandom(64))
        (tag / "mp_rank_00_model_states.pt").write_bytes(os.urandom(256))
        return
    if kind == "bad-state":
        (tag / "trainer_state.json").write_text("{not json")
        return
    if kind == "other-experts":
        argv = [a if i != 4 else "4" for i, a in enumerate(argv)]  # MOE 4, the run has 8
    cfg = RunConfig.from_settings(resolve_settings(argv, os.environ)[0])
    vocab = load_tokenizer(str(sandbox / "data" / "tokenizer"), kind="gpt2bpe").vocab_size
    (tag / "model_config.json").write_text(json.dumps(cfg.model_config(vocab).to_dict()))
    written = {"truncated": 4096, "random-bytes": 256}.get(kind, 256)
    (tag / "mp_rank_00_model_states.pt").write_bytes(os.urandom(100 if kind == "truncated" else written))
    layout = {"world_size": 1, "ep_size": 1, "zero_stage": 0, "precision": "fp32"}
    (tag / "trainer_state.json").write_text(json.dumps(
        {"iteration": 1, "layout": layout, "files": {"mp_rank_00_model_states.pt": written}}))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, sandbox, monkeypatch, capsys, tmp_path):
    name, tool, argv, env, setup, code, message = case
    from launcher.cluster import free_port

    port = free_port()
    out = sandbox / "out"
    fill = {"d": sandbox / "data", "s": sandbox, "port": port}
    argv = [a.format(**fill) for a in argv.split()]
    for var in CLUSTER_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OUTPUT_BASEPATH", str(out))
    monkeypatch.setenv("GLOBAL_BATCH_SIZE", "8")
    for var, value in env.items():
        monkeypatch.setenv(var, value.format(**fill))
    cleanups = []
    if setup == "busy-port":
        listener = socket.socket()
        listener.bind(("127.0.0.1", port))
        listener.listen()
        cleanups.append(listener.close)
    elif setup == "no-cuda":
        monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    elif setup == "one-core":
        monkeypatch.setattr("launcher.data.pipeline.default_workers", lambda: 1)
    elif setup == "tokenizer-beside-cut":
        monkeypatch.setenv("DATA_PATH", str(sandbox / "data" / "cut"))
    elif setup == "live-job":
        cleanups.append(_live_job(sandbox, out))
    elif setup and setup.startswith("load:"):
        _damaged_checkpoint(sandbox, setup[len("load:"):], argv)
    elif setup == "garbage-checkpoint":  # `latest` names a tag that is not there
        (sandbox / "garbage" / "checkpoints").mkdir(parents=True, exist_ok=True)
        (sandbox / "garbage" / "checkpoints" / "latest").write_text("iter_0000009\n")
    before = snapshot(sandbox)
    TALLY["tried"] += 1
    try:
        if setup == "subprocess":  # a native abort here would take the test process down
            module = {"launcher": "launcher", "preprocess": "launcher.preprocess"}[tool]
            proc = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True,
                                  cwd=ROOT, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
            got, err = proc.returncode, proc.stderr
        else:
            got = run_in_process(tool, argv)
            err = capsys.readouterr().err
    finally:
        for cleanup in cleanups:
            cleanup()
    lines = [line for line in err.splitlines() if line.strip()]
    assert got == code, err
    assert "Traceback" not in err, err
    assert 1 <= len(lines) <= 3, err
    assert message in err, err
    after = snapshot(sandbox)
    if setup == "live-job":  # the holder's own folder and lock file are its, not ours
        after = {k: v for k, v in after.items() if not k.startswith("out")}
        before = {k: v for k, v in before.items() if not k.startswith("out")}
    assert after == before, sorted(set(after) ^ set(before))
    TALLY["clean"] += 1
    if os.environ.get("SHOW_ERRORS"):
        print(f"\n[{name}] {err.strip()}")


def run_in_process(tool: str, argv: list[str]) -> int:
    if tool == "launcher":
        from launcher.__main__ import main
    elif tool == "preprocess":
        from launcher.preprocess import main
    elif tool == "generate":
        from launcher.generate import main
    else:
        from launcher.evaluate import main
    return main(argv)


def teardown_module(module):
    print(f"\nbad-input table: {TALLY['tried']} tried, {TALLY['clean']} clean")
