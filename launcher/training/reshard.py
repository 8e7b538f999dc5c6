"""Resuming on another number of processes: a checkpoint's optimizer state, read by parameter name and
re-partitioned for this run's layout (processes, expert-parallel size, ZeRO stage 0/1/2).

DeepSpeed loads its optimizer files only into the layout that wrote them: ZeRO refuses another data-parallel
size, and its universal-checkpoint conversion does not handle MoE expert files. What the files hold:

  ZeRO 0    expp_rank_<e>_mp_rank_00_optim_states.pt (the main file for a dense model): the torch optimizer
            state of expert-parallel rank e, dense parameters whole and rank e's experts stacked, in the order
            of the optimizer's parameter groups; under bf16 DeepSpeed's unfused optimizer keeps the fp32 master
            weights beside it (`fp32_groups`).
  ZeRO 1/2  [bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt: rank r's partition of each group's flat fp32
            weights and Adam moments, with `param_slice_mappings` (name -> start, numel in that partition).
            A parameter's slices, in rank order over its group's ranks (every rank for dense groups; for expert
            groups the expert-data-parallel ranks e, e + EP, e + 2 EP, ... of expert-parallel rank e),
            concatenate to the whole parameter (rank e's experts, stacked).

`SavedOptimizerState` answers "this rank's part of parameter `name`'s `exp_avg`" (for experts, joined from
the saved expert-parallel ranks that held them) from either layout, reading the files memory-mapped, one
parameter at a time;
`install` writes into this run's engine what this rank holds: whole tensors under ZeRO 0, this rank's fragment
of each parameter under ZeRO 1/2 (through the engine's own parameter -> partition mapping), the rows of this
rank's experts for expert parameters. Model weights come from the model files as always (every expert file is
read by global id, whatever EP wrote it); RNG streams restart from a seed (they cannot be split or joined).

Supported: any change of processes, EP_SIZE and ZeRO stage (0, 1, 2), same precision (fp32 or bf16), no
sequence parallelism. Refused with one line: other precisions, fp16 (its loss-scaler state), SP > 1.
"""
from __future__ import annotations

from pathlib import Path

import torch

from launcher.errors import UsageError

MOMENTS = ("exp_avg", "exp_avg_sq")
MASTER = "fp32"


def reshard_refusal(saved, now) -> str | None:
    """Why a checkpoint written by layout `saved` cannot be loaded into `now` (both `Layout`s); None if it can."""
    if saved == now:
        return None
    if saved.precision != now.precision:
        return (f"written in {saved.precision}, this run is {now.precision}; resume with PRECISION="
                f"{saved.precision} (processes, EP_SIZE and ZERO may change)")
    if now.precision == "fp16":
        return ("an fp16 run resumes only with the processes, EP_SIZE and ZERO that wrote it (fp32 and bf16 runs "
                "may change them)")
    if saved.sp_size > 1 or now.sp_size > 1:
        return ("with sequence parallelism (SP > 1) a run resumes only with the processes, EP_SIZE and ZERO that "
                "wrote it")
    return None


def _names(module) -> dict:
    return {p: n for n, p in module.named_parameters()}


def _expert_names(module) -> set[str]:
    from deepspeed.moe.utils import is_moe_param

    return {n for n, p in module.named_parameters() if is_moe_param(p)}


def _local_experts(module, name: str) -> slice:
    """Rows of this rank's experts in the whole (every expert) tensor of expert parameter `name`."""
    owner = module.get_submodule(name.rsplit(".", 1)[0])
    return slice(owner.first_expert, owner.first_expert + owner.num_local_experts)


class SavedOptimizerState:
    """The optimizer state of checkpoint `tag_dir`, written by layout `saved`, by parameter name."""

    def __init__(self, tag_dir: Path, saved, module):
        from model.checkpoint import CheckpointError, safe_load

        self.tag_dir = tag_dir
        self.saved = saved
        self.shapes = {n: p.shape for n, p in module.named_parameters()}
        self.experts = _expert_names(module)
        self.local_experts = {n: _local_experts(module, n) for n in self.experts}
        self.total_experts = {n: module.get_submodule(n.rsplit(".", 1)[0]).num_experts for n in self.experts}

        def load(name: str):
            try:
                return safe_load(tag_dir / name, mmap=True)
            except CheckpointError as exc:
                raise UsageError(str(exc)) from None

        self._load = load
        if saved.zero_stage == 0:
            self._read_zero0(module)
        else:
            self._read_zero12()

    # ------------------------------------------------------------------ ZeRO 0
    def _read_zero0(self, module) -> None:
        from launcher.training.optim import param_groups
        from model.checkpoint import MODEL_STATES

        names = _names(module)
        groups = [[names[p] for p in g["params"]] for g in param_groups(module, 0.0)]
        files = ([f"expp_rank_{e}_mp_rank_00_optim_states.pt" for e in range(self.saved.ep_size)] if self.experts
                 else [MODEL_STATES])
        self._zero0 = []  # per expert-parallel rank: name -> {key: tensor}
        for file in files:
            saved = self._load(file).get("optimizer")
            if not isinstance(saved, dict):
                raise UsageError(f"{self.tag_dir / file}: no optimizer state in it")
            torch_state = saved.get("optimizer_state_dict", saved)  # bf16: DeepSpeed's unfused optimizer
            masters = saved.get("fp32_groups")
            saved_groups = torch_state["param_groups"]
            if [len(g["params"]) for g in saved_groups] != [len(g) for g in groups]:
                raise UsageError(f"{self.tag_dir / file}: its optimizer groups hold "
                                 f"{[len(g['params']) for g in saved_groups]} parameters, this model's "
                                 f"{[len(g) for g in groups]}; the checkpoint is of another model")
            by_name = {}
            for g, (group, saved_group) in enumerate(zip(groups, saved_groups)):
                for j, (name, index) in enumerate(zip(group, saved_group["params"])):
                    entry = dict(torch_state["state"].get(index, {}))
                    if masters is not None:
                        entry[MASTER] = masters[g][j]
                    by_name[name] = entry
            self._zero0.append(by_name)
        self.step = self._first_step(self._zero0[0].values())

    # ------------------------------------------------------------------ ZeRO 1/2
    def _read_zero12(self) -> None:
        prefix = "bf16_" if self.saved.precision == "bf16" else ""
        self._shards = []
        for rank in range(self.saved.world_size):
            shard = self._load(f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").get("optimizer_state_dict")
            if not isinstance(shard, dict) or "param_slice_mappings" not in shard:
                raise UsageError(f"{self.tag_dir}: ZeRO file of rank {rank} holds no partitioned optimizer state")
            self._shards.append(shard)
        self._group = {}
        for shard in self._shards:
            for g, mapping in enumerate(shard["param_slice_mappings"]):
                for name in mapping:
                    self._group[name] = g
        self.step = self._first_step(self._base_states(self._shards[0]).values())

    def _zero12_piece(self, name: str, key: str, ranks) -> torch.Tensor:
        """Parameter `name` as the flat concatenation of its slices on `ranks`, in order."""
        g = self._group[name]
        pieces = []
        for rank in ranks:
            shard = self._shards[rank]
            where = shard["param_slice_mappings"][g].get(name)
            if where is None:
                continue
            if key == MASTER:
                flat = shard["single_partition_of_fp32_groups"][g]
            else:
                flat = self._base_states(shard)[g][key]
            pieces.append(flat.narrow(0, where.start, where.numel))
        return torch.cat(pieces)

    @staticmethod
    def _base_states(shard) -> dict:
        """Group index -> the flat partition's optimizer state (a torch state dict, or DeepSpeed's elastic list)."""
        state = shard["base_optimizer_state"]
        return state["state"] if isinstance(state, dict) else dict(enumerate(state))

    # ------------------------------------------------------------------ answers
    @staticmethod
    def _first_step(states) -> float:
        for state in states:
            if "step" in state:
                return float(state["step"])
        return 0.0

    def has(self, key: str) -> bool:
        if self.saved.zero_stage == 0:
            return any(key in entry for entry in self._zero0[0].values())
        return True  # ZeRO 1/2 keep fp32 masters and the moments of every parameter

    def _saved_part(self, name: str, key: str, ep_rank: int | None) -> torch.Tensor:
        """A dense parameter whole (ep_rank None), or the experts saved expert-parallel rank `ep_rank` held."""
        if self.saved.zero_stage == 0:
            return self._zero0[ep_rank or 0][name][key]
        world, ep = self.saved.world_size, self.saved.ep_size
        return self._zero12_piece(name, key, range(world) if ep_rank is None else range(ep_rank, world, ep))

    def local(self, name: str, key: str) -> torch.Tensor:
        """What this rank holds of parameter `name`'s `key` (an Adam moment, or MASTER): the whole tensor, or the
        rows of its experts, read from only the saved ranks that held them."""
        if name not in self.shapes:
            raise UsageError(f"{self.tag_dir}: the optimizer state has no entry for {name}")
        shape = self.shapes[name]
        try:
            if name not in self.experts:
                return self._saved_part(name, key, None).reshape(shape)
            rows = self.local_experts[name]
            per_rank = self.total_experts[name] // self.saved.ep_size  # experts each saved EP rank held
            first, last = rows.start // per_rank, (rows.stop - 1) // per_rank
            stacked = torch.cat([self._saved_part(name, key, e).reshape(per_rank, *shape[1:])
                                 for e in range(first, last + 1)])
            offset = rows.start - first * per_rank
            return stacked[offset:offset + rows.stop - rows.start]
        except RuntimeError:
            raise UsageError(f"{self.tag_dir}: the optimizer state of {name} does not fit this model's "
                             f"{tuple(shape)}") from None


def install(engine, saved: SavedOptimizerState) -> None:
    """Write `saved` into this rank's part of `engine`'s optimizer (freshly built, before its first step)."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    optimizer = engine.optimizer
    if isinstance(optimizer, DeepSpeedZeroOptimizer):
        _install_zero12(optimizer, saved)
    elif hasattr(optimizer, "fp32_groups") and hasattr(optimizer, "fp16_groups"):
        _install_unfused(optimizer, saved, _names(engine.module))
    elif isinstance(optimizer, torch.optim.Optimizer):
        _install_plain(optimizer, optimizer.param_groups, saved, _names(engine.module))
    else:
        raise UsageError(f"resuming at another size: DeepSpeed's {type(optimizer).__name__} is not supported; "
                         "resume with the processes, EP_SIZE and ZERO that wrote the checkpoint")


def _state(saved: SavedOptimizerState, name: str, like: torch.Tensor) -> dict:
    state = {"step": torch.tensor(saved.step, dtype=torch.float32)}
    for key in MOMENTS:
        state[key] = saved.local(name, key).to(like.device, like.dtype).reshape(like.shape).clone()
    return state


def _install_plain(optimizer, groups, saved, names) -> None:
    """A torch optimizer over the model's own (fp32) parameters: ZeRO 0 in fp32."""
    for group in groups:
        for param in group["params"]:
            optimizer.state[param] = _state(saved, names[param], param)


def _install_unfused(optimizer, saved, names) -> None:
    """DeepSpeed's unfused optimizer (ZeRO 0 in bf16): fp32 masters beside the model's bf16 parameters."""
    for lp_group, master_group in zip(optimizer.fp16_groups, optimizer.fp32_groups):
        for lp, master in zip(lp_group, master_group):
            name = names[lp]
            if saved.has(MASTER):
                master.data.copy_(saved.local(name, MASTER).reshape(master.shape))
            optimizer.optimizer.state[master] = _state(saved, name, master)


def _install_zero12(optimizer, saved) -> None:
    """ZeRO 1/2: each group's flat fp32 partition and its moments, filled fragment by fragment."""
    for i, group in enumerate(optimizer.optimizer.param_groups):
        flat = group["params"][0]
        state = {"step": torch.tensor(saved.step, dtype=torch.float32), **{k: torch.zeros_like(flat) for k in MOMENTS}}
        for lp in optimizer.bit16_groups[i]:
            mapping = lp._hp_mapping
            if mapping is None:  # no part of this parameter in this rank's partition
                continue
            name = optimizer.param_names[lp]
            lp_at, hp_at = mapping.lp_fragment_address, mapping.hp_fragment_address
            for key in MOMENTS + ((MASTER,) if saved.has(MASTER) else ()):
                fragment = saved.local(name, key).reshape(-1).narrow(0, lp_at.start, lp_at.numel)
                target = mapping.hp_fragment if key == MASTER else state[key].narrow(0, hp_at.start, hp_at.numel)
                target.data.copy_(fragment)
        optimizer.optimizer.state[flat] = state
    optimizer._hp_optimizer_states_linked = False  # the engine links each parameter to its moments at the next step
