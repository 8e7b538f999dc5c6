"""lm-evaluation-harness (lm-eval 0.4.x) on an in-memory GPT-MoE, offline.

The model runs through lm-eval's own `HFLM` class: the checkpoint becomes a `GPTMoEForCausalLM` (the
transformers wrapper, model/hf.py) and the tokenizer a `PreTrainedTokenizerFast` (`Tokenizer.to_hf`), so
nothing is exported or downloaded. Task files in this project's jsonl format get generated YAML configs
(`dataset_path: json`, `data_files` the local jsonl); an lm-eval task folder of your own works too
(`include_path`). Nothing is fetched: the hub and datasets run in offline mode, built-in task folders are
not indexed, and `datasets`' cache for the run goes to a temporary folder.

lm-eval is an optional dependency: `pip install -e .[eval]` (`make setup` installs it).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

from launcher.errors import UsageError

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
_METRICS = {
    "completion": (("acc", "mean"), ("perplexity", "perplexity")),
    "multiple_choice": (("acc", "mean"), ("acc_norm", "mean")),
}


def task_yaml(name: str, kind: str, jsonl: str | Path, cache_dir: str | Path | None = None) -> str:
    """An lm-eval task config for a task file of this project's format (launcher/evaluation/tasks.py)."""
    import yaml

    config = {"task": name, "dataset_path": "json",
              "dataset_kwargs": {"data_files": {"test": str(Path(jsonl).resolve())}},
              "test_split": "test", "doc_to_text": "{{context}}",
              # The jsonl holds the exact text: no separator between context and continuation.
              "target_delimiter": ""}
    if cache_dir is not None:
        config["dataset_kwargs"]["cache_dir"] = str(cache_dir)
    if kind == "completion":
        config.update(output_type="loglikelihood", doc_to_target="{{target}}")
    elif kind == "multiple_choice":
        config.update(output_type="multiple_choice", doc_to_target="label", doc_to_choice="choices")
    else:
        raise ValueError(f"task kind {kind!r}")
    higher_is_better = {"acc": True, "acc_norm": True, "perplexity": False}
    config["metric_list"] = [{"metric": m, "aggregation": a, "higher_is_better": higher_is_better[m]}
                             for m, a in _METRICS[kind]]
    config["metadata"] = {"version": 1.0}
    return yaml.safe_dump(config, sort_keys=False)


def go_offline() -> None:
    """No hub or dataset downloads from this process on. The libraries read these variables when first
    imported; where one is imported already, its module-level switch is set too."""
    os.environ.update(OFFLINE_ENV)
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.constants as hub

        hub.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True
        datasets.config.HF_DATASETS_OFFLINE = True


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise UsageError(f"lm-eval is not installed ({err}); install it with: pip install -e '.[eval]'") from None
    return lm_eval, HFLM, TaskManager


def harness_model(model, tokenizer, batch_size: int, device="cpu"):
    """lm-eval's HFLM around the transformers wrapper of a GPTMoE (EP=1, as load_for_inference returns)."""
    from model.hf import GPTMoEForCausalLM

    _, HFLM, _ = _import_lm_eval()
    hf_model = GPTMoEForCausalLM.from_gpt_moe(model).to(device).eval()
    return HFLM(pretrained=hf_model, tokenizer=tokenizer.to_hf(), batch_size=batch_size,
                max_length=model.config.seq_len, device=str(device))


class _DropTruncationNotes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Truncating" not in record.getMessage()


@contextmanager
def _quiet_truncation():
    """HFLM warns once per request whose context it cuts to the model's length: thousands of lines for a
    small model, about what is expected (our scorer cuts the same way)."""
    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    note_filter = _DropTruncationNotes()
    hf_logger.addFilter(note_filter)
    try:
        yield
    finally:
        hf_logger.removeFilter(note_filter)


def _summary(results: dict, samples: dict | None) -> dict:
    """lm-eval's per-task results with its "metric,filter" keys as plain metric names."""
    out = {}
    for task, metrics in results.items():
        entry = {}
        for key, value in metrics.items():
            if "," in key:
                metric, _ = key.split(",", 1)
                if value != "N/A":
                    entry[metric] = value
        if samples is not None and task in samples:
            entry["examples"] = len(samples[task])
        out[task] = entry
    return out


def run_lm_eval(model, tokenizer, task_files: Sequence[str | Path] = (), include_path: str | Path | None = None,
                task_names: Sequence[str] = (), batch_size: int = 16, limit: int | None = None,
                device="cpu") -> dict:
    """{task: {metric: value}} from lm-eval for this project's task files and/or named tasks of an lm-eval
    task folder (`include_path`). Offline; `limit` examples per task."""
    from launcher.evaluation.tasks import Task, load_task, scorable

    go_offline()
    if not task_files and not task_names:
        raise UsageError("lm-eval: no tasks (give task files, or --lm-eval-include DIR with --lm-eval-tasks)")
    if task_names and include_path is None:
        raise UsageError("--lm-eval-tasks names tasks of an lm-eval task folder: give it with --lm-eval-include")
    if include_path is not None and not Path(include_path).is_dir():
        raise UsageError(f"--lm-eval-include {include_path}: not a folder")
    lm_eval, _, TaskManager = _import_lm_eval()
    tasks = [load_task(p) for p in task_files]  # checked here, so lm-eval sees only well-formed files
    with tempfile.TemporaryDirectory(prefix="gptmoe-lm-eval-") as tmp:
        yaml_dir = Path(tmp) / "tasks"
        yaml_dir.mkdir()
        for task in tasks:
            # The examples our scorer keeps (lm-eval stops at a continuation longer than the context).
            examples = task.examples if limit is None else task.examples[:limit]
            kept, _ = scorable(Task(task.name, task.kind, task.path, examples), tokenizer, model.config.seq_len)
            if not kept:
                raise UsageError(f"task {task.path}: no example's continuation fits the model's "
                                 f"{model.config.seq_len} tokens")
            jsonl = yaml_dir / f"{task.name}.jsonl"
            jsonl.write_text("".join(json.dumps({k: v for k, v in e.items() if k != "line"}) + "\n" for e in kept))
            (yaml_dir / f"{task.name}.yaml").write_text(task_yaml(task.name, task.kind, jsonl,
                                                                  cache_dir=Path(tmp) / "datasets"))
        paths = [str(yaml_dir)] + ([str(include_path)] if include_path is not None else [])
        manager = TaskManager(include_path=paths, include_defaults=False)
        names = [t.name for t in tasks] + list(task_names)
        unknown = [n for n in task_names if n not in manager.all_tasks]
        if unknown:
            raise UsageError(f"--lm-eval-tasks: {', '.join(unknown)} not found under {include_path}")
        lm = harness_model(model, tokenizer, batch_size, device)
        with _quiet_truncation():
            output = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit,
                                             bootstrap_iters=0, log_samples=True, random_seed=0,
                                             numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    return _summary(output["results"], output.get("samples"))
