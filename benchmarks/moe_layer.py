"""Forward + backward time of our MoE layer against a dense FFN of the same active FLOPs and DeepSpeed's MoE.

    python benchmarks/moe_layer.py [--tokens 4096] [--hidden 256] [--ffn 1024] [--experts 8 64] [--repeats 10]

For each expert count E it times, on the same random input and output gradient:
  dense k=1   one FFN D -> F -> D: the active FLOPs of top-1
  dense k=2   one FFN D -> 2F -> D: the active FLOPs of top-2 and of expert choice at 2 experts per token
  ours        every router (top-1, top-2, expert choice at 2 experts/token), token-dropping and dropless
  deepspeed   deepspeed.moe.layer.MoE with the same settings (top-1, top-2; it has no expert choice)
  experts     our stacked experts alone on a ready (E, T/E, D) buffer, no router, dispatch or combine:
              the floor of top-1 (E x larger weights and weight gradients, smaller GEMMs, same FLOPs)
and two parts of the layer against the plain way of writing them:
  dispatch+combine  top-1 with drops: model/moe/dispatch.py's hand-written backward vs the same gather and
                    weighted index_add through autograd
  expert softmax    model/moe/router.py's expert_softmax vs torch.softmax over the expert dim (forward only)
Expert choice has a fixed capacity by definition, so it has no dropless training mode (its dropless path is
per-token inference routing). Every MoE includes its router, dispatch, combine and the balancing loss in the
backward pass. Times are medians over --repeats runs after warm-up; ratios are to the FLOP-matched dense
FFN. The last line printed is one JSON object with every median and ratio.

Memory: glibc hands blocks over 32 MiB back to the OS when freed and page-faults them in again at the next
step; an MoE's expert gradients are such blocks (64 experts: 64 MiB per projection), so on CPU that cost
(about half the step at E=64) would swamp the layers being compared. By default the benchmark therefore
keeps freed memory in the process (mallopt: no mmap, no trim), as a caching allocator does on GPUs or
jemalloc/tcmalloc on CPUs, for every candidate alike; --system-malloc measures glibc's default instead.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.config import GPTMoEConfig  # noqa: E402
from model.moe.experts import GroupedExperts  # noqa: E402
from model.moe.dispatch import CapacityDispatcher  # noqa: E402
from model.moe.layer import MLP, MoELayer  # noqa: E402
from model.moe.router import TopKRouter, expert_softmax  # noqa: E402

# expert choice at 2 experts per token on average
ROUTERS = {"top1": dict(router_type="top1"), "top2": dict(router_type="top2"),
           "ec": dict(router_type="expert_choice", expert_choice_k=2.0)}
DENSE_WIDTH = {"top1": 1, "top2": 2, "ec": 2}  # FFN width multiple with the same active FLOPs


def keep_freed_memory() -> bool:
    """Serve every allocation from the heap and never trim it (glibc mallopt), so freed blocks are reused."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def timed(steps: dict, repeats: int, warmup: int = 2) -> dict:
    """Median ms per step. Steps run round-robin, so a slow spell on a shared machine hits all of them."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {key: [] for key in steps}
    for _ in range(repeats):
        for key, step in steps.items():
            start = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(t) * 1000.0 for key, t in times.items()}


def fwd_bwd(module, x, grad, params):
    """One forward + backward; the MoE's balancing loss joins the backward like in training."""
    def step():
        for p in params:
            p.grad = None
        x.grad = None
        out = module(x)
        if isinstance(out, torch.Tensor):
            out.backward(grad)
            return
        hidden, aux = out[0], out[1]
        if aux.requires_grad:  # expert choice has no balancing loss
            torch.autograd.backward([hidden, aux], [grad, torch.ones_like(aux)])
        else:
            hidden.backward(grad)
    return step


def ours(args, num_experts: int, router: str, drop: bool) -> MoELayer:
    cfg = GPTMoEConfig(vocab_size=128, seq_len=8, num_layers=2, hidden_size=args.hidden, num_heads=1,
                       ffn_hidden_size=args.ffn, num_experts=num_experts, drop_tokens=drop, **ROUTERS[router])
    layer = MoELayer(cfg, num_experts)
    layer.reset_parameters(0.02, 0.02)
    return layer.train()


def deepspeed_moe(args, num_experts: int, router: str, drop: bool):
    from deepspeed.moe.layer import MoE

    layer = MoE(args.hidden, MLP(args.hidden, args.ffn, bias=False), num_experts=num_experts, ep_size=1,
                k=1 if router == "top1" else 2, capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=4,
                drop_tokens=drop, use_rts=True, top2_2nd_expert_sampling=False)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return layer.train()


def parts(args, num_experts: int, x, grad) -> dict:
    """Steps timing dispatch + combine and the expert softmax against their plain autograd forms."""
    router = TopKRouter(args.hidden, num_experts, 1, capacity_factor=1.0, min_capacity=4, drop_tokens=True).train()
    routing = router(x.detach())
    dispatcher = CapacityDispatcher(routing, num_experts, routing.capacity, x.shape[0])
    weight_R = routing.weight_R.detach().requires_grad_()
    rows = dispatcher.rows
    kept_R = (routing.position_R < routing.capacity).float()

    def ours_step():
        x.grad = weight_R.grad = None
        out = dispatcher.combine(dispatcher.dispatch(x), weight_R)
        out.backward(grad)

    def autograd_step():
        x.grad = weight_R.grad = None
        buffer_ND = x.index_select(0, rows.source_N) * rows.filled_N.unsqueeze(-1)
        routed_RD = buffer_ND.index_select(0, rows.read_R) * (weight_R * kept_R).unsqueeze(-1)
        out = torch.zeros_like(x).index_add(0, routing.token_R, routed_RD)
        out.backward(grad)

    logits_TE = torch.randn(x.shape[0], num_experts)
    return {"dispatch_combine/ours": ours_step, "dispatch_combine/plain": autograd_step,
            "softmax/ours": lambda: expert_softmax(logits_TE),
            "softmax/plain": lambda: torch.softmax(logits_TE, dim=-1)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--system-malloc", action="store_true", help="keep glibc's default (see the docstring)")
    args = parser.parse_args(argv)
    if any(args.tokens % e for e in args.experts):
        parser.error(f"--tokens {args.tokens} must be a multiple of every expert count {args.experts}")
    if args.threads:
        torch.set_num_threads(args.threads)
    heap = not args.system_malloc and keep_freed_memory()
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.hidden, requires_grad=True)
    grad = torch.randn(args.tokens, args.hidden)
    print(f"# {args.tokens} tokens, hidden {args.hidden}, ffn {args.ffn}, fp32, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, malloc {'keeps freed memory' if heap else 'glibc default'}; "
          f"forward+backward, median of {args.repeats} (ms); load average {os.getloadavg()}")

    result = {"tokens": args.tokens, "hidden": args.hidden, "ffn": args.ffn, "threads": torch.get_num_threads(),
              "malloc": "heap" if heap else "system", "ms": {}, "ratio": {}}
    for e in args.experts:
        ms = timed(parts(args, e, x, grad), args.repeats)
        for part in ("dispatch_combine", "softmax"):
            ours_ms, plain_ms = ms[f"{part}/ours"], ms[f"{part}/plain"]
            result["ms"].update({f"E{e}/{part}/ours": round(ours_ms, 3), f"E{e}/{part}/plain": round(plain_ms, 3)})
            result["ratio"][f"E{e}/{part}"] = round(plain_ms / ours_ms, 3)
            print(f"E={e:<3} {part:17s} ours {ours_ms:8.3f}  plain {plain_ms:8.3f}  "
                  f"plain/ours {plain_ms / ours_ms:5.2f}")
    for e in args.experts:
        steps = {}
        for width in sorted(set(DENSE_WIDTH.values())):
            mlp = MLP(args.hidden, width * args.ffn, bias=False)
            steps[f"dense_k{width}"] = fwd_bwd(mlp, x, grad, list(mlp.parameters()))
        experts = GroupedExperts(e, args.hidden, args.ffn, group_name="bench")
        experts.reset_parameters(0.02, 0.02, seed=0)
        buffer = x.detach().view(e, -1, args.hidden).clone().requires_grad_()
        steps["experts"] = fwd_bwd(experts, buffer, grad.view_as(buffer), list(experts.parameters()))
        for router in ROUTERS:
            for drop in (True, False):
                if router == "ec" and not drop:
                    continue
                impls = {"ours": ours} if router == "ec" else {"ours": ours, "deepspeed": deepspeed_moe}
                for name, make in impls.items():
                    torch.manual_seed(1)
                    layer = make(args, e, router, drop)
                    steps[f"E{e}/{router}/{'drop' if drop else 'dropless'}/{name}"] = fwd_bwd(
                        layer, x, grad, list(layer.parameters()))
        ms = timed(steps, args.repeats)
        for key, value in ms.items():
            if key.startswith("dense"):
                result["ms"][f"E{e}/{key}"] = round(value, 2)
                print(f"E={e:<3} dense FFN D->{key[-1]}F->D        {value:8.1f}")
        floor = ms.pop("experts")
        result["ms"][f"E{e}/experts"] = round(floor, 2)
        result["ratio"][f"E{e}/experts"] = round(floor / ms["dense_k1"], 3)
        print(f"E={e:<3} experts alone (top-1 floor) {floor:8.1f}  {floor / ms['dense_k1']:5.2f}x dense")
        for key, value in ms.items():
            if key.startswith("dense"):
                continue
            router = key.split("/")[1]
            base = ms[f"dense_k{DENSE_WIDTH[router]}"]
            result["ms"][key] = round(value, 2)
            result["ratio"][key] = round(value / base, 3)
            print(f"{key:28s}  {value:8.1f}  {value / base:5.2f}x dense")
    result["loadavg"] = os.getloadavg()
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
