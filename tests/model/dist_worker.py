"""One of two gloo processes started by test_distributed.py (RANK/WORLD_SIZE/MASTER_* in the environment).

Runs three checks and saves what each produced to <outdir>/rank<r>.pt for the parent to compare with a
single-process reference:
  ep       the same model at EP=2 (DeepSpeed's groups) on this rank's half of the batch
  engine   deepspeed.initialize with EP=2 + ZeRO-1 and ZeRO-2, two optimizer steps, save_checkpoint,
           load_checkpoint
  ulysses  DeepSpeed-Ulysses attention over a sequence split in two
The cases and batches are defined here so the parent builds exactly the same ones.
"""
import os
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from model import GPTMoE, GPTMoEConfig  # noqa: E402

EP_CASES = {
    "top1-drop": dict(router_type="top1", capacity_factor=0.75, use_rts=False),
    "top1-dropless": dict(router_type="top1", drop_tokens=False),
    "top2-drop-residual": dict(router_type="top2", capacity_factor=0.75, use_rts=False, use_residual=True),
    "top2-dropless": dict(router_type="top2", drop_tokens=False, num_layers=4, num_experts=[2, 4]),
    "expert-choice": dict(router_type="expert_choice", expert_choice_k=2.0),
}
ENGINE_CASE = dict(router_type="top1", capacity_factor=1.0, use_rts=False)
ENGINE_STEPS = 2
ZERO_STAGES = (1, 2)
LR = 0.5
CLIP = 1.0  # the global norm spans every rank's experts: clipping checks that DeepSpeed sees them all


def config(case: dict, ep_size: int) -> GPTMoEConfig:
    return GPTMoEConfig.from_size("nano", **{"vocab_size": 97, "seq_len": 32, "num_experts": 4, "ep_size": ep_size,
                                             **case})


def batch(seed: int, rank: int, size=(2, 16)):
    """This rank's micro-batch: input ids and aligned labels."""
    gen = torch.Generator().manual_seed(1000 * seed + rank)
    sample = torch.randint(0, 97, (size[0], size[1] + 1), generator=gen)
    return sample[:, :-1], sample[:, 1:]


def optimizer(model):
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()), "name": "all"})
    # SGD, not Adam: Adam's first steps divide by |grad| and would blow float noise in near-zero gradients
    # up to lr-sized differences between two correct runs.
    return torch.optim.SGD(groups, lr=LR, momentum=0.9)


def run_ep(rank: int) -> dict:
    from model.parallel import expert_parallel_rank, setup_expert_parallel

    results = {}
    for name, case in EP_CASES.items():
        torch.manual_seed(0)
        model = GPTMoE(config(case, ep_size=2), ep_rank=expert_parallel_rank(rank, 2))
        setup_expert_parallel(model)
        x, y = batch(0, rank)
        out = model.train()(x, labels=y)
        out.total_loss.backward()
        with torch.no_grad():
            eval_logits = model.eval()(x).logits
        results[name] = {"logits": out.logits.detach(), "loss": out.loss.detach(), "aux": out.aux_loss.detach(),
                         "z": out.z_loss.detach(), "counts": [s["expert_counts"] for s in out.moe_stats],
                         "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
                         "eval_logits": eval_logits, "buffers": dict(model.named_buffers())}
    return results


def run_engine(rank: int, outdir: Path, stage: int) -> dict:
    import deepspeed
    from model.parallel import expert_parallel_rank

    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
                 "gradient_clipping": CLIP, "steps_per_print": 10**6}
    ckpt = str(outdir / f"ckpt_zero{stage}")
    torch.manual_seed(0)
    model = GPTMoE(config(ENGINE_CASE, ep_size=2), ep_rank=expert_parallel_rank(rank, 2))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer(model), config=ds_config)
    for step in range(ENGINE_STEPS):
        x, y = batch(step + 1, rank)
        engine.backward(engine(x, labels=y).total_loss)
        engine.step()
    engine.save_checkpoint(ckpt, tag="final")
    probe, _ = batch(99, 0)
    with torch.no_grad():
        logits = engine.module.eval()(probe).logits

    torch.manual_seed(123)  # a differently initialised model, restored from the checkpoint
    fresh = GPTMoE(config(ENGINE_CASE, ep_size=2), ep_rank=expert_parallel_rank(rank, 2))
    engine2, *_ = deepspeed.initialize(model=fresh, optimizer=optimizer(fresh), config=ds_config)
    engine2.load_checkpoint(ckpt, tag="final")
    with torch.no_grad():
        reloaded = engine2.module.eval()(probe).logits
    return {"logits": logits, "reloaded": reloaded, "has_moe_layers": engine.has_moe_layers}


def run_ulysses(rank: int) -> dict:
    import torch.distributed as dist

    from model.parallel import apply_sequence_parallel, sequence_shard

    torch.manual_seed(0)
    model = GPTMoE(config(dict(router_type="top2", drop_tokens=False), ep_size=1)).train()
    apply_sequence_parallel(model, dist.group.WORLD)
    x, y = batch(7, 0)  # the same full batch on both ranks; each keeps its half of the sequence
    x_local, positions = sequence_shard(x, rank, 2)
    y_local, _ = sequence_shard(y, rank, 2)
    out = model(x_local, labels=y_local, position_ids=positions)
    (out.loss * y_local.numel()).backward()  # summed over ranks: the full batch's summed loss
    return {"logits": out.logits.detach(), "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}


def main(outdir: str):
    import deepspeed

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    deepspeed.init_distributed(dist_backend="gloo")
    outdir = Path(outdir)
    results = {"ep": run_ep(rank), "ulysses": run_ulysses(rank)}
    for stage in ZERO_STAGES:
        results[f"engine_zero{stage}"] = run_engine(rank, outdir, stage)
    torch.save(results, outdir / f"rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
