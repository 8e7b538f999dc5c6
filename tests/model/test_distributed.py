"""Two gloo processes against one: expert parallelism, the DeepSpeed engine with our MoE layer, Ulysses.

The workers (dist_worker.py) run once per session; each test compares one part with a single-process
reference built from the same seeds and batches.
"""
import os
import subprocess
import sys

import pytest
import torch

from launcher.cluster import free_port
from model import GPTMoE
from model.checkpoint import load_deepspeed_checkpoint

from . import dist_worker as W

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("model-distributed")]
WORLD = 2


@pytest.fixture(scope="session")
def worker_results(tmp_path_factory):
    """Run the two workers once per test session. Under pytest-xdist every worker process has its own
    session; the workers' shared temp folder and a file lock make the first one run them and the others
    read its results (the xdist_group mark alone does not keep them together with pytest 9)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return _run_workers(tmp_path_factory.mktemp("dist"))
    from filelock import FileLock

    outdir = tmp_path_factory.getbasetemp().parent / "model-distributed"
    with FileLock(f"{outdir}.lock"):
        if (outdir / "done").exists():
            return outdir, _load(outdir)
        outdir.mkdir(exist_ok=True)
        results = _run_workers(outdir)
        (outdir / "done").touch()
        return results


def _load(outdir):
    return [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _run_workers(outdir):
    port = free_port()
    procs = []
    for rank in range(WORLD):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, W.__file__, str(outdir)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("distributed workers timed out")
        logs.append(out)
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{log[-4000:]}"
    return outdir, _load(outdir)


def _is_expert(name: str) -> bool:
    return name.endswith(("fc1_weight", "fc2_weight"))


@pytest.mark.parametrize("case", list(W.EP_CASES))
def test_expert_parallel_matches_one_process(worker_results, case):
    _, results = worker_results
    torch.manual_seed(0)
    ref = GPTMoE(W.config(W.EP_CASES[case], ep_size=1)).train()
    outs = []
    for rank in range(WORLD):  # routing is per rank: the reference routes each half on its own
        x, y = W.batch(0, rank)
        outs.append(ref(x, labels=y))
    sum(o.total_loss for o in outs).backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    # Expert-choice thresholds: one calibration per step from the group's mean, the same on every rank
    # (the reference, routing two halves, calibrated twice); compare eval logits under the ranks' values.
    buffers = results[0]["ep"][case]["buffers"]
    for name, value in buffers.items():
        torch.testing.assert_close(results[1]["ep"][case]["buffers"][name], value)
    ref.load_state_dict(buffers, strict=False)
    ref.eval()

    shared_sum = {}
    for rank, out in enumerate(outs):
        got = results[rank]["ep"][case]
        torch.testing.assert_close(got["logits"], out.logits)
        torch.testing.assert_close(got["loss"], out.loss)
        torch.testing.assert_close(got["aux"], out.aux_loss)
        torch.testing.assert_close(got["z"], out.z_loss)
        with torch.no_grad():
            torch.testing.assert_close(got["eval_logits"], ref(W.batch(0, rank)[0]).logits)
        for name, grad in got["grads"].items():
            if _is_expert(name):  # this rank's experts, with gradients from both ranks' tokens
                rows = grad.shape[0]
                torch.testing.assert_close(grad, ref_grads[name][rank * rows:(rank + 1) * rows], msg=name)
            else:
                shared_sum[name] = shared_sum.get(name, 0) + grad
    for name, grad in shared_sum.items():  # what data-parallel all-reduce would sum
        torch.testing.assert_close(grad, ref_grads[name], msg=name)
    # expert counts are global over the expert-parallel group
    for layer, counts in enumerate(results[0]["ep"][case]["counts"]):
        want = outs[0].moe_stats[layer]["expert_counts"] + outs[1].moe_stats[layer]["expert_counts"]
        assert torch.equal(counts, want) and torch.equal(results[1]["ep"][case]["counts"][layer], want)


@pytest.mark.parametrize("stage", W.ZERO_STAGES)
def test_deepspeed_engine_trains_saves_and_loads_at_another_ep_size(worker_results, stage):
    outdir, results = worker_results
    results = [r[f"engine_zero{stage}"] for r in results]
    ckpt = outdir / f"ckpt_zero{stage}"
    assert results[0]["has_moe_layers"]
    files = sorted(p.name for p in (ckpt / "final").glob("layer_*_expert_*"))
    assert files == [f"layer_0_expert_{e}_mp_rank_00_model_states.pt" for e in range(4)]  # global numbering

    # Reference: the same two steps in one process, averaging the two ranks' losses as data parallelism does.
    torch.manual_seed(0)
    ref = GPTMoE(W.config(W.ENGINE_CASE, ep_size=1)).train()
    initial = {k: v.clone() for k, v in ref.state_dict().items()}
    opt = W.optimizer(ref)
    for step in range(W.ENGINE_STEPS):
        opt.zero_grad()
        loss = sum(ref(*W.batch(step + 1, r)[:1], labels=W.batch(step + 1, r)[1]).total_loss for r in range(WORLD))
        (loss / WORLD).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), W.CLIP)
        opt.step()

    # The EP=2 checkpoint, loaded into a single-process EP=1 model, is that reference model.
    torch.manual_seed(5)
    single = GPTMoE(W.config(W.ENGINE_CASE, ep_size=1))
    load_deepspeed_checkpoint(single, ckpt)
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(single.state_dict()[name], value, msg=name, rtol=1e-4, atol=1e-6)
        if _is_expert(name):  # the experts did train: a wrong reduction could not hide behind a no-op
            assert (value - initial[name]).abs().max() > 1e-4
    probe, _ = W.batch(99, 0)
    with torch.no_grad():
        want = single.eval()(probe).logits
    for rank in range(WORLD):
        torch.testing.assert_close(results[rank]["logits"], want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(results[rank]["reloaded"], results[rank]["logits"])


def test_ulysses_attention_matches_full_attention(worker_results):
    _, results = worker_results
    torch.manual_seed(0)
    ref = GPTMoE(W.config(dict(router_type="top2", drop_tokens=False), ep_size=1)).train()
    x, y = W.batch(7, 0)
    out = ref(x, labels=y)
    (out.loss * y.numel()).backward()
    half = x.shape[1] // WORLD
    for rank in range(WORLD):
        torch.testing.assert_close(results[rank]["ulysses"]["logits"], out.logits[:, rank * half:(rank + 1) * half])
    for name, p in ref.named_parameters():
        got = sum(results[r]["ulysses"]["grads"][name] for r in range(WORLD))
        torch.testing.assert_close(got, p.grad, msg=name, rtol=1e-4, atol=1e-6)
