"""The resolved-settings block that `dryrun` prints (and `run` prints before it starts)."""
from __future__ import annotations

from launcher.config import POSITIONAL, RunConfig, flag_name, label
from launcher.memory import GIB, estimate_memory, planning_note
from model.config import GPTMoEConfig


def _count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(int(n))


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _shape(cfg: RunConfig) -> str:
    """`nano` or `nano with --hidden-size 128 --num-layers 4`: the size preset and what the run changed in it."""
    changed = " ".join(f"{flag_name(k)} {v}" for k, v in cfg.shape_changes().items())
    return cfg.model_size + (f" with {changed}" if changed else "")


def _sources(cfg: RunConfig, origins: dict[str, str]) -> list[str]:
    """Where each setting given came from, one line per source; the rest are defaults."""
    positional = {setting: i for i, setting in enumerate(POSITIONAL.values())}
    by_source: dict[str, list[str]] = {}
    # positional arguments in their order, then the rest as given
    for setting in sorted(origins, key=lambda s: positional.get(s, len(positional))):
        origin = origins[setting]
        if origin == "line":
            name = label(setting) if setting in positional else flag_name(setting)
        elif origin == "environment":
            name = label(setting)
        else:  # a run file: as it spells the setting
            name = flag_name(setting)[2:]
        by_source.setdefault(origin, []).append(name)
    order = [o for o in ("line", "environment") if o in by_source] + [o for o in by_source if o not in
                                                                        ("line", "environment")]
    lines = [f"from {'the ' if o in ('line', 'environment') else ''}{o}: {' '.join(by_source[o])}" for o in order]
    lines.append(f"the rest: defaults, and the {cfg.model_size} size preset")
    return [f"{'settings' if i == 0 else '':13}{line}" for i, line in enumerate(lines)]


def summary(cfg: RunConfig, mcfg: GPTMoEConfig, ds_path: str, command: str,
            origins: dict[str, str] | None = None) -> str:
    """mcfg: the GPTMoEConfig trained (the tokenizer's vocabulary); ds_path: the written DeepSpeed JSON;
    command: the launch line; origins: where each setting given came from (`cli.resolve_settings`)."""
    counts = mcfg.param_counts()
    moe_layers = mcfg.moe_layer_indices()
    lines = [f"run          {cfg.run_name}  ({cfg.mode})",
             f"model        {_shape(cfg)}: {mcfg.num_layers} layers, hidden {mcfg.hidden_size}, "
             f"{mcfg.num_heads} heads, ffn {mcfg.ffn_hidden_size}, seq {mcfg.seq_len}, vocab {mcfg.vocab_size}"]
    if mcfg.is_moe:
        per_layer = mcfg.num_experts if isinstance(mcfg.num_experts, int) else "/".join(map(str, mcfg.num_experts))
        ec = (f", {mcfg.expert_choice_k:g} expert(s) per token before the capacity factor"
              if mcfg.router_type.top_k is None else "")
        lines.append(
            f"  experts    {per_layer} per MoE layer on {len(moe_layers)} of {mcfg.num_layers} layers "
            f"({', '.join(map(str, moe_layers))}), router {mcfg.router_type.value} = {mcfg.router_type.label}{ec}, "
            f"capacity factor {mcfg.capacity_factor:g} train / {mcfg.eval_capacity_factor:g} eval, "
            f"min capacity {mcfg.min_capacity}, token dropping {'on' if mcfg.drop_tokens else 'off'}, "
            f"aux loss coef {mcfg.aux_loss_coef:g}"
            + (f", expert bias (rate {mcfg.expert_bias_rate:g})" if mcfg.expert_bias else "")
            + (", residual (PR-MoE)" if mcfg.use_residual else ""))
    else:
        lines.append("  experts    none (dense)")
    lines.append(f"  params     total {_count(counts['total'])} ({counts['total']:,}), active per token "
                 f"{_count(counts['active'])} ({counts['active']:,}), experts {_count(counts['expert'])}")
    lines += [
        f"parallelism  world {cfg.world_size} = {cfg.num_nodes} node(s) x {cfg.gpus_per_node} process(es) "
        f"[{cfg.device}]; data-parallel {cfg.dp_size}, expert-parallel {mcfg.ep_size}, "
        f"sequence-parallel {cfg.sp_size}",
        f"batch        micro {cfg.micro_batch}, accumulation {cfg.grad_accum}, global {cfg.global_batch} sequences "
        f"x {mcfg.seq_len} = {cfg.tokens_per_iter:,} tokens",
        f"schedule     {cfg.train_iters:,} iterations ({_count(cfg.train_tokens)} tokens), warm-up "
        f"{cfg.warmup_iters:,} iterations, lr {cfg.lr:g} -> {cfg.min_lr:g} {cfg.lr_decay}, seed {cfg.seed}",
    ]
    if cfg.finetune:
        lines.append(_finetune(cfg))
    lines += [
        f"precision    {cfg.precision}",
        f"zero         stage {cfg.zero_stage}" + (", optimizer offloaded to CPU" if cfg.offload == "cpu" else ""),
        f"recompute    {mcfg.recompute}",
        f"checkpoints  every {cfg.save_interval:,} iterations -> {cfg.run_dir / 'checkpoints'}"
        + (f"; resume from {cfg.load}" if cfg.load else ""),
        f"paths        {_data(cfg)}; tokenizer {cfg.resolved_tokenizer_path}",
        f"             run dir {cfg.run_dir}; deepspeed config {ds_path}",
    ]
    if not cfg.data_path and not cfg.finetune:
        lines.append(f"  data       {embedded_corpus_note(cfg)}")
    mem = estimate_memory(cfg, mcfg)
    verdict = "fits" if mem.fits else "DOES NOT FIT" + (
        " (launching anyway: --ignore-memory-check)" if cfg.ignore_memory_check and cfg.mode == "run" else
        (" (`run` refuses it; --ignore-memory-check overrides)" if cfg.mode == "dryrun" else ""))
    lines.append(
        f"memory       per process: weights {_gib(mem.weights)} + gradients {_gib(mem.gradients)} + optimizer "
        f"{_gib(mem.optimizer)} + max(activations {_gib(mem.activations)}, optimizer-step buffers "
        f"{_gib(mem.step_buffers)}) + overhead {_gib(mem.overhead)} = {_gib(mem.total)} of "
        f"{_gib(mem.device_total)} ({mem.device_name}): {verdict}")
    lines.append(f"             {planning_note(cfg)}")
    if mem.host_offload:
        lines.append(f"             host memory for ZeRO-Offload: {_gib(mem.host_offload)} per process")
    if origins is not None:
        lines += _sources(cfg, origins)
    lines.append(f"launch       {command}")
    return "\n".join(lines)


def _data(cfg: RunConfig) -> str:
    if cfg.finetune:
        return f"train {cfg.finetune.train_path}, valid {cfg.finetune.valid_path}"
    return f"data {cfg.resolved_data_path} (split {cfg.split})"


def _finetune(cfg: RunConfig) -> str:
    ft = cfg.finetune
    per_epoch = cfg.train_iters // ft.epochs
    samples = f"{ft.samples} samples of up to {ft.sample_tokens} tokens" if ft.samples else "no samples"
    return (f"finetune     task {ft.task_name}: {ft.epochs} epoch(s) x {per_epoch:,} iterations "
            f"({'packed' if ft.pack else 'one example per sequence'}, loss on target tokens only), warm-up "
            f"{ft.warmup_fraction:g} of them; after each epoch: validation ({cfg.eval_iters} steps), checkpoint "
            f"(the last and the best are kept), {samples}\n"
            f"             weights from {ft.pretrained} (optimizer and schedule start afresh)")


def embedded_corpus_note(cfg: RunConfig) -> str:
    """What a run without DATA_PATH trains on, and how to give it real data."""
    note = (f"no DATA_PATH: the embedded corpus, the Python standard library's own sources (~12 MB of code and "
            f"English), tokenized with {cfg.tokenizer} into {cfg.default_data_dir} on first use: a demo, not "
            "pretraining data. Train on yours: python -m launcher.preprocess --input FILES --output-prefix "
            "data/mine --tokenizer-type " + cfg.tokenizer + " --vocab-size N, then DATA_PATH=data/mine")
    if cfg.tokenizer == "jiebabpe":
        note += " (jiebabpe segments Chinese words; on this code corpus it is plain byte-level BPE)"
    return note
