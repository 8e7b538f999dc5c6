"""RunConfig -> DeepSpeed JSON, checked with DeepSpeed's own parser."""
from __future__ import annotations

from typing import TYPE_CHECKING

from launcher.errors import UsageError

if TYPE_CHECKING:
    from launcher.config import RunConfig


def build_ds_config(cfg: RunConfig) -> dict:
    ds: dict = {
        "train_batch_size": cfg.global_batch,
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.clip_grad,
        "steps_per_print": cfg.log_interval,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,  # a torch optimizer on CPU (DeepSpeed's compiles for a minute)
        "zero_optimization": _zero(cfg),
    }
    if cfg.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif cfg.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                      "hysteresis": 2, "min_loss_scale": 1}
    if cfg.model.recompute == "full":
        ds["activation_checkpointing"] = {"partition_activations": False, "contiguous_memory_optimization": False,
                                          "cpu_checkpointing": False, "number_checkpoints": cfg.model.num_layers,
                                          "synchronize_checkpoint_boundary": False, "profile": False}
    return ds


def _zero(cfg: RunConfig) -> dict:
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.zero_stage > 0:
        zero.update(contiguous_gradients=True, overlap_comm=cfg.device == "cuda",
                    reduce_bucket_size=50_000_000, allgather_bucket_size=50_000_000)
    if cfg.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.device == "cuda"}
    return zero


def check_ds_config(ds: dict) -> None:
    """Parse with DeepSpeed's DeepSpeedConfig; raise UsageError with its message if it refuses.

    Outside a process group DeepSpeed assumes one rank, so the batch triple is checked here against
    the data-parallel size and DeepSpeed sees the per-rank equivalent.
    """
    from deepspeed.runtime.config import DeepSpeedConfig

    micro, accum = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    if ds["train_batch_size"] % (micro * accum):
        raise UsageError(f"DeepSpeed config: train_batch_size {ds['train_batch_size']} is not a multiple of "
                         f"micro batch x accumulation = {micro} x {accum}")
    per_rank = dict(ds, train_batch_size=micro * accum)
    try:
        DeepSpeedConfig(per_rank)
    except Exception as exc:  # DeepSpeed raises assorted types (AssertionError, ValidationError, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"DeepSpeed rejects the generated config: {first}") from None

