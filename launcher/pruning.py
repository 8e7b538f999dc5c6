"""Expert pruning for inference (Kim et al. 2021): keep the experts a calibration set routes most tokens to.

`prune_checkpoint` loads a checkpoint into this process (every expert, whatever EP size wrote it), runs the
calibration set through it and counts, per MoE layer, the routes each expert takes and the router
probability it receives (padding excluded), keeps the N experts with the most routes (`by="tokens"`, ties
broken by probability) or probability mass (`by="probability"`), cuts the model and its Adam state the same
way (model/surgery.py: router rows and per-expert router entries go with their experts; a layer keeping one
expert becomes a dense feed-forward layer), evaluates before and after, and writes OUT_DIR as a run folder
the trainer could have written (one process, EP 1, ZeRO 0; launcher/training/offline.py), with
`pruning.json` beside its checkpoints. Nothing is written until everything else has worked, and the folder
appears whole (built under a temporary name, then renamed).
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from launcher.errors import UsageError

BY = ("tokens", "probability")
RESULTS_FILE = "pruning.json"
CALIBRATION_SPLIT = "valid"


# ---------------------------------------------------------------------------------------------- counting
@dataclass
class LayerUsage:
    """What the calibration set asked of one MoE layer's experts."""

    layer: int  # block index
    routes_E: torch.Tensor  # long: routes each expert took (a token counts once per expert it visits)
    probability_E: torch.Tensor  # float64: router probability summed over tokens
    tokens: int  # calibration tokens through the layer

    @property
    def num_experts(self) -> int:
        return self.routes_E.numel()

    def token_shares(self) -> list[float]:
        """Each expert's share of the layer's routes (top-1: of its tokens)."""
        total = max(int(self.routes_E.sum()), 1)
        return [int(n) / total for n in self.routes_E]

    def probability_shares(self) -> list[float]:
        return (self.probability_E / max(self.tokens, 1)).tolist()


class _RoutingCounter:
    """Forward hooks on every router of `model`, counting routes and probability of real (unpadded) tokens."""

    def __init__(self, model):
        from model.moe.layer import moe_layers

        self.mask_T: torch.Tensor | None = None
        self.usage = []
        self.handles = []
        blocks = model.config.moe_layer_indices()
        for block, layer in zip(blocks, moe_layers(model)):
            usage = LayerUsage(block, torch.zeros(layer.num_experts, dtype=torch.long),
                               torch.zeros(layer.num_experts, dtype=torch.float64), 0)
            self.usage.append(usage)
            self.handles.append(layer.deepspeed_moe.gate.register_forward_hook(self._hook(usage)))

    def _hook(self, usage: LayerUsage):
        from model.moe.router import count, expert_softmax

        def hook(router, args, routing):
            mask_T = self.mask_T
            probs_TE = expert_softmax(router.logits(args[0]))
            usage.probability_E += probs_TE[mask_T].sum(dim=0).double().cpu()
            real_R = mask_T.index_select(0, routing.token_R)
            usage.routes_E += count(routing.expert_R[real_R], usage.num_experts).cpu()
            usage.tokens += int(mask_T.sum())

        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def count_expert_usage(model, windows: Iterator[Sequence[int]], batch_size: int = 16, device="cpu",
                       progress=None) -> list[LayerUsage]:
    """Per MoE layer, what `windows` (token id sequences of at most seq_len) route to each expert, in eval mode
    (the routing of evaluation and generation: deterministic, dropless)."""
    was_training = model.training
    model.eval()
    counter = _RoutingCounter(model)
    try:
        batch: list[Sequence[int]] = []
        for window in windows:
            batch.append(window)
            if len(batch) == batch_size:
                _forward(model, counter, batch, device, progress)
                batch = []
        if batch:
            _forward(model, counter, batch, device, progress)
    finally:
        counter.close()
        model.train(was_training)
    return counter.usage


def _forward(model, counter: _RoutingCounter, batch, device, progress) -> None:
    width = max(len(w) for w in batch)
    input_ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.bool)
    for row, window in enumerate(batch):
        input_ids[row, :len(window)] = torch.as_tensor(window, dtype=torch.long)
        mask[row, :len(window)] = True
    # Right padding: under causal attention and per-token routing, real positions never see it.
    counter.mask_T = mask.reshape(-1).to(device)
    model(input_ids.to(device))
    if progress is not None:
        progress(len(batch))


def calibration_windows(source: Sequence[str], tokenizer, seq_len: int, vocab_size: int, split: str,
                        limit: int | None, json_key: str = "text") -> tuple[str, int, Iterator[Sequence[int]]]:
    """(name, windows, the windows): an indexed dataset's validation part as training samples it, or text files
    cut into seq_len pieces after an end-of-document token. `limit`: sequences (indexed) or documents."""
    from launcher.evaluation.perplexity import indexed_prefix, indexed_split, read_documents

    prefix = indexed_prefix(source)
    if prefix is not None:
        dataset, n, _ = indexed_split(prefix, split, CALIBRATION_SPLIT, seq_len, vocab_size, limit)
        return f"{os.path.basename(prefix)}/{CALIBRATION_SPLIT}", n, (dataset[i][:-1] for i in range(n))
    documents = read_documents(source, json_key, limit, "--calibration")
    eod = tokenizer.eod_id
    windows = [ids[i:i + seq_len] for doc in tokenizer.encode_batch(documents) for ids in [[eod, *doc]]
               for i in range(0, len(ids), seq_len)]
    name = Path(source[0]).name + (f"+{len(source) - 1}" if len(source) > 1 else "")
    return name, len(windows), iter(windows)


# ---------------------------------------------------------------------------------------------- choosing
def parse_keep(text: str | int | Sequence[int], experts: Sequence[int]) -> list[int]:
    """`--keep N` (every MoE layer) or `N1,N2,...` (one per MoE layer) -> a count per MoE layer, checked."""
    if isinstance(text, int):
        counts = [text] * len(experts)
    elif isinstance(text, str):
        parts = [p.strip() for p in text.split(",")]
        if not all(re.fullmatch(r"\d+", p) for p in parts):
            raise UsageError(f"--keep: got {text!r}; allowed: an expert count, or one per MoE layer like 4,2")
        counts = [int(p) for p in parts] * (len(experts) if len(parts) == 1 else 1)
    else:
        counts = list(text)
    if len(counts) != len(experts):
        raise UsageError(f"--keep: got {len(counts)} counts; allowed: one count, or one per MoE layer "
                         f"({len(experts)}: the model has {'/'.join(map(str, experts))} experts)")
    for i, (n, e) in enumerate(zip(counts, experts)):
        if not 1 <= n <= e:
            raise UsageError(f"--keep: got {n} for MoE layer {i}; allowed: 1..{e} (its expert count; 1 makes it "
                             "a dense feed-forward layer)")
    return counts


def choose_experts(usage: Sequence[LayerUsage], counts: Sequence[int], by: str = "tokens") -> list[list[int]]:
    """The `counts[i]` experts of layer i with the most routes (ties: probability, then the lower id) or the
    most probability mass (ties: routes, then id); each list in ascending expert order."""
    if by not in BY:
        raise UsageError(f"--by: got {by!r}; allowed: {' | '.join(BY)}")
    keep = []
    for layer, n in zip(usage, counts):
        routes, prob = layer.routes_E.tolist(), layer.probability_E.tolist()
        key = ((lambda e: (-routes[e], -prob[e], e)) if by == "tokens" else (lambda e: (-prob[e], -routes[e], e)))
        keep.append(sorted(sorted(range(layer.num_experts), key=key)[:n]))
    return keep


# ---------------------------------------------------------------------------------------------- optimizer state
class PrunedOptimizerState:
    """The checkpoint's Adam state (launcher.training.reshard.SavedOptimizerState of the unpruned model) cut as
    the weights are: what `reshard.install` writes into the pruned model's optimizer."""

    def __init__(self, saved, config, keep):
        self.saved, self.config, self.keep = saved, config, keep
        self.step = saved.step
        self._pruned: dict[str, dict] = {}

    def has(self, key: str) -> bool:
        return self.saved.has(key)

    def local(self, name: str, key: str) -> torch.Tensor:
        from model.surgery import prune_state_dict

        if key not in self._pruned:
            whole = {n: self.saved.local(n, key) for n in self.saved.shapes}  # every expert: the model is EP 1
            self._pruned[key] = prune_state_dict(whole, self.config, self.keep)
        return self._pruned[key][name]


def _optimizer_state(tag_dir: Path, model, keep) -> tuple[PrunedOptimizerState | None, str]:
    from launcher.training.checkpoint import Layout, read_trainer_state
    from launcher.training.reshard import SavedOptimizerState

    layout = Layout.of_checkpoint(tag_dir, read_trainer_state(tag_dir))
    if layout.precision == "fp16":
        return None, "fresh (an fp16 run's optimizer state stays with its layout)"
    try:
        return PrunedOptimizerState(SavedOptimizerState(tag_dir, layout, model), model.config, keep), \
            "Adam state of the kept weights carried over"
    except (UsageError, KeyError, RuntimeError) as exc:
        return None, f"fresh (the checkpoint's optimizer state cannot be read: {str(exc).splitlines()[0][:200]})"


# ---------------------------------------------------------------------------------------------- the run folder
def _absolute_data_path(data_path: str) -> str:
    """Each prefix of a (possibly weighted) data path made absolute, so the run folder can live anywhere."""
    from launcher.data.gpt_dataset import _as_weight

    return " ".join(t if _as_weight(t) is not None else os.path.abspath(t) for t in data_path.split())


def pruned_run_config(original, keep: Sequence[Sequence[int]], out_dir: Path):
    """The RunConfig of the pruned run: the original's settings with the pruned model, one process, EP 1,
    ZeRO 0, named after OUT_DIR, its data and tokenizer by absolute path. fp16 runs become fp32."""
    from model.surgery import pruned_config

    return dataclasses.replace(
        original, mode="run", gpus_per_node=1, num_nodes=1, node_rank=0, hostfile=None, sp_size=1, zero_stage=0,
        offload="none", load=None, upcycle_from=None, model=pruned_config(original.model, keep),
        output_basepath=str(out_dir.resolve().parent), run_name=out_dir.name,
        data_path=_absolute_data_path(original.resolved_data_path),
        tokenizer_path=os.path.abspath(original.resolved_tokenizer_path),
        precision="fp32" if original.precision == "fp16" else original.precision)


def check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UsageError(f"OUT_DIR: {out_dir} exists and is not empty; allowed: a new (or empty) folder")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", out_dir.resolve().name):
        raise UsageError(f"OUT_DIR: got {out_dir.name!r}; allowed: a folder name of letters, digits and . _ + - "
                         "(it names the pruned run)")


def _write_run(out_dir: Path, cfg, mcfg, model, tag_dir: Path, state: dict, optimizer_state, report: dict) -> Path:
    """OUT_DIR as a run folder, built under a temporary name and renamed into place; returns its tag folder."""
    from launcher.ds_config import build_ds_config
    from launcher.files import write_json_atomic, write_text_atomic
    from launcher.training.offline import write_checkpoint

    out_dir = out_dir.resolve()
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tag = write_checkpoint(cfg, mcfg, model, tag_dir / "tokenizer", int(state["iteration"]),
                               int(state.get("tokens") or 0), tmp / "checkpoints", optimizer_state)
        cfg.save(tmp / "run_config.json")
        write_text_atomic(cfg.to_yaml(given=("precision",)), tmp / "run_config.yaml")
        write_json_atomic(build_ds_config(cfg), tmp / "ds_config.json")
        write_json_atomic(report, tmp / RESULTS_FILE)
        if out_dir.is_dir():
            out_dir.rmdir()  # empty, checked before
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir / "checkpoints" / tag.name


# ---------------------------------------------------------------------------------------------- the command
def _evaluate(model, tokenizer, data, split: str, limit, batch_size: int) -> dict | None:
    from launcher.evaluation import evaluate_model

    if not data:
        return None
    results = evaluate_model(model, tokenizer, [data], (), split=split, limit=limit, batch_size=batch_size)
    name, entry = next(iter(results["validation"].items()))
    return {"data": name, "tokens": entry["tokens"], "loss": entry["loss"], "perplexity": entry["perplexity"]}


def _counts(mcfg) -> dict:
    counts = mcfg.param_counts()
    return {"total": counts["total"], "active": counts["active"], "expert": counts["expert"],
            "experts_per_moe_layer": mcfg.experts_per_moe_layer(), "num_experts": mcfg.num_experts}


def prune_checkpoint(checkpoint: str | Path, out_dir: str | Path, keep: str | int | Sequence[int], *,
                     by: str = "tokens", calibration: Sequence[str] | None = None, calibration_limit: int | None = None,
                     eval_data: Sequence[str] | None = None, eval_limit: int | None = None, json_key: str = "text",
                     batch_size: int = 16, progress: bool = False) -> dict:
    """Prune `checkpoint` (a run, checkpoints or tag folder) to `keep` experts per MoE layer and write the run
    folder `out_dir`. calibration / eval_data: an indexed dataset prefix or text/jsonl files (default: the
    run's own validation split); eval_data [] skips the evaluation. Returns the report (also in pruning.json)."""
    from launcher.config import RunConfig
    from launcher.data.indexed import exists
    from launcher.training.checkpoint import RUN_CONFIG, load_for_inference, read_trainer_state
    from model.config import ConfigError
    from model.surgery import prune_experts, pruned_config

    out_dir = Path(out_dir)
    if by not in BY:
        raise UsageError(f"--by: got {by!r}; allowed: {' | '.join(BY)}")
    for name, value in (("--calibration-limit", calibration_limit), ("--eval-limit", eval_limit),
                        ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise UsageError(f"{name}: got {value}; allowed: an integer >= 1")
    check_out_dir(out_dir)
    model, tokenizer, tag_dir = load_for_inference(checkpoint)
    mcfg = model.config
    if not mcfg.is_moe:
        raise UsageError(f"{tag_dir}: a dense model; pruning needs an MoE checkpoint")
    counts = parse_keep(keep, mcfg.experts_per_moe_layer())
    original = RunConfig.read(tag_dir / RUN_CONFIG)
    try:
        pruned_config(mcfg, [range(n) for n in counts])
    except ConfigError as exc:
        raise UsageError(f"--keep: {'/'.join(map(str, counts))} does not make a valid model: "
                         f"{str(exc).split(': ', 1)[-1]}") from None
    run_data = original.resolved_data_path if exists(original.resolved_data_path) else None
    calibration = list(calibration) if calibration else ([run_data] if run_data else None)
    if not calibration:
        raise UsageError(f"the run's data {original.resolved_data_path} is not here; give --calibration (an indexed "
                         "dataset prefix or text/jsonl files)")
    eval_source = (list(eval_data) if eval_data is not None else [run_data] if run_data else calibration)

    name, n, windows = calibration_windows(calibration, tokenizer, mcfg.seq_len, mcfg.vocab_size, original.split,
                                           calibration_limit, json_key)
    bar = _progress(n, f"calibration {name}", progress)
    usage = count_expert_usage(model, windows, batch_size, progress=bar.update)
    bar.close()
    keep_ids = choose_experts(usage, counts, by)
    before = _evaluate(model, tokenizer, eval_source, original.split, eval_limit, batch_size)
    pruned = prune_experts(model, keep_ids)
    after = _evaluate(pruned, tokenizer, eval_source, original.split, eval_limit, batch_size)

    state = read_trainer_state(tag_dir)
    cfg = pruned_run_config(original, keep_ids, out_dir)
    pruned_mcfg = dataclasses.replace(pruned.config, ep_size=1)
    optimizer_state, optimizer_note = _optimizer_state(tag_dir, model, keep_ids)
    report = {
        "checkpoint": str(tag_dir.resolve()), "iteration": state["iteration"], "output": str(out_dir.resolve()),
        "keep": counts, "by": by,
        "calibration": {"data": name, "sequences": n, "tokens": usage[0].tokens if usage else 0},
        "layers": [_layer_report(i, u, kept, pruned_mcfg) for i, (u, kept) in enumerate(zip(usage, keep_ids))],
        "parameters": {"before": _counts(mcfg), "after": _counts(pruned_mcfg)},
        "validation": {"before": before, "after": after},
        "optimizer": optimizer_note,
    }
    new_tag = _write_run(out_dir, cfg, pruned_mcfg, pruned.train(), tag_dir, state, optimizer_state, report)
    return {**report, "checkpoint_written": str(new_tag)}


def _layer_report(index: int, usage: LayerUsage, kept: list[int], pruned_mcfg) -> dict:
    shares, probs = usage.token_shares(), usage.probability_shares()
    return {"moe_layer": index, "layer": usage.layer, "experts": usage.num_experts, "kept": kept,
            "dense": usage.layer not in pruned_mcfg.moe_layer_indices(),
            "kept_token_share": [shares[e] for e in kept], "kept_probability_share": [probs[e] for e in kept],
            "token_coverage": sum(shares[e] for e in kept), "probability_coverage": sum(probs[e] for e in kept),
            "routes": usage.routes_E.tolist(), "probability": usage.probability_E.tolist()}


def _progress(total: int, desc: str, show: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="seq", disable=not show, leave=False)


def format_report(report: dict) -> str:
    """The report as a few lines for people."""
    from launcher.evaluation.report import _number, _table

    cal = report["calibration"]
    out = [f"pruned {report['checkpoint']} (iteration {report['iteration']}) -> {report['checkpoint_written']}",
           f"kept by {report['by']}, counted on {cal['data']} ({cal['sequences']:,} sequences, {cal['tokens']:,} "
           "tokens)", ""]
    rows = []
    for layer in report["layers"]:
        kept = " ".join(str(e) for e in layer["kept"]) + (" (dense)" if layer["dense"] else "")
        rows.append([str(layer["layer"]), f"{layer['experts']} -> {len(layer['kept'])}", kept,
                     " ".join(f"{s:.2f}" for s in layer["kept_token_share"]), f"{layer['token_coverage']:.3f}",
                     f"{layer['probability_coverage']:.3f}"])
    out += _table(["layer", "experts", "kept", "their shares of tokens", "tokens kept", "probability kept"], rows)
    p = report["parameters"]
    out += ["", f"parameters  total {p['before']['total']:,} -> {p['after']['total']:,} "
                f"({p['after']['total'] / p['before']['total']:.1%}), active per token {p['before']['active']:,} -> "
                f"{p['after']['active']:,}"]
    before, after = report["validation"]["before"], report["validation"]["after"]
    if before and after:
        out.append(f"validation  loss {_number(before['loss'])} -> {_number(after['loss'])}, perplexity "
                   f"{_number(before['perplexity'], 2)} -> {_number(after['perplexity'], 2)} ({before['data']}, "
                   f"{before['tokens']:,} tokens)")
    out.append(f"optimizer   {report['optimizer']}")
    return "\n".join(out)

