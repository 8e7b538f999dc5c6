"""Evaluating trained models: held-out loss and perplexity, zero-shot tasks, lm-evaluation-harness.

    from launcher.evaluation import evaluate_checkpoint
    results = evaluate_checkpoint("runs/mine", tasks=["stdlib"], limit=200)
    results["validation"]["stdlib_text_document/valid"]["loss"], results["tasks"]["stdlib_next_line"]["acc"]

`evaluate_checkpoint` loads a checkpoint (any expert-parallel size) into this process and merges its results
into <checkpoint tag folder>/evaluation.json; `evaluate_model` does the same for a model in memory and
writes nothing. Data: perplexity.py; task formats and metrics: tasks.py; the project's own tasks:
stdlib_tasks.py; lm-eval: harness.py.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

from launcher.errors import UsageError

logger = logging.getLogger(__name__)

STDLIB_TASKS = "stdlib"  # in a task list: the project's own tasks, generated on demand
DEFAULT_TASK_DIR = "data/tasks"


def _as_source(spec) -> list[str]:
    return [str(spec)] if isinstance(spec, (str, os.PathLike)) else [str(s) for s in spec]


def resolve_task_files(tasks: Sequence[str], task_dir: str | Path = DEFAULT_TASK_DIR) -> list[Path]:
    """Task file paths; "stdlib" stands for the project's own tasks, written under task_dir if missing."""
    files: list[Path] = []
    for task in tasks:
        if task == STDLIB_TASKS:
            from launcher.evaluation.stdlib_tasks import write_stdlib_tasks

            files += list(write_stdlib_tasks(task_dir).values())
        else:
            files.append(Path(task))
    return files


def check_settings(limit: int | None, batch_size: int, tasks: Sequence[str] = ()) -> None:
    """The cheap checks, done before a checkpoint is loaded."""
    if limit is not None and limit < 1:
        raise UsageError(f"--limit: got {limit}; allowed: an integer >= 1")
    if batch_size < 1:
        raise UsageError(f"--batch-size: got {batch_size}; allowed: an integer >= 1")
    for task in tasks:
        if task != STDLIB_TASKS and not Path(task).is_file():
            raise UsageError(f"task file {task}: not found (a .jsonl task file, or {STDLIB_TASKS!r})")


def evaluate_model(model, tokenizer, data: Sequence = (), tasks: Sequence[str] = (), *, split: str = "98,2,0",
                   data_split: str = "valid", json_key: str = "text", limit: int | None = None,
                   batch_size: int = 16, device="cpu", task_dir: str | Path = DEFAULT_TASK_DIR,
                   lm_eval: bool = False, lm_eval_include: str | None = None, lm_eval_tasks: Sequence[str] = (),
                   progress: bool = False) -> dict:
    """Results for a GPTMoE in eval mode holding every expert (EP=1) and its tokenizer.

    data: sources, each an indexed dataset prefix (its `data_split` part under `split` is evaluated) or a
    list of text/jsonl files and folders. tasks: task files, or "stdlib". lm_eval: also run the tasks
    through lm-eval; lm_eval_include/lm_eval_tasks: tasks of an lm-eval task folder. limit: sequences
    (indexed data), documents (text) or examples (tasks) per entry.
    """
    from launcher.evaluation.perplexity import evaluate_indexed, evaluate_text, indexed_prefix
    from launcher.evaluation.tasks import evaluate_task, load_task

    check_settings(limit, batch_size, tasks)
    seq_len, vocab_size = model.config.seq_len, model.config.vocab_size
    task_files = resolve_task_files(tasks, task_dir)
    loaded = [load_task(p) for p in task_files]  # every file checked before anything runs
    names = [t.name for t in loaded]
    if len(set(names)) != len(names):
        raise UsageError(f"two task files share a name: {sorted(n for n in names if names.count(n) > 1)[0]}")
    sources = [_as_source(s) for s in data]
    results: dict = {"validation": {}, "tasks": {}}
    for source in sources:
        prefix = indexed_prefix(source)
        if prefix is not None:
            name = f"{os.path.basename(prefix)}/{data_split}"
            results["validation"][name] = evaluate_indexed(model, prefix, split, data_split, seq_len, vocab_size,
                                                           limit, batch_size, device, tokenizer.eod_id, progress)
        else:
            name = Path(source[0]).name + (f"+{len(source) - 1}" if len(source) > 1 else "")
            results["validation"][name] = evaluate_text(model, tokenizer, source, json_key, seq_len, limit,
                                                        batch_size, device, progress)
    for task in loaded:
        results["tasks"][task.name] = evaluate_task(model, tokenizer, task, seq_len, vocab_size, batch_size,
                                                    device, limit, progress)
    if lm_eval or lm_eval_tasks:
        from launcher.evaluation.harness import run_lm_eval

        results["lm_eval"] = run_lm_eval(model, tokenizer, task_files if lm_eval else (), lm_eval_include,
                                         lm_eval_tasks, batch_size, limit, device)
    settings = {"limit": limit, "batch_size": batch_size, "seq_len": seq_len}
    for section in ("validation", "tasks", "lm_eval"):
        for entry in (results.get(section) or {}).values():
            entry.setdefault("settings", settings)
    return {k: v for k, v in results.items() if v}


def _run_settings(tag_dir: Path) -> dict:
    """What the checkpoint's run trained on: its split, its data (None: the embedded corpus)."""
    from launcher.training.checkpoint import RUN_CONFIG

    path = tag_dir / RUN_CONFIG
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    settings = {"split": saved.get("split"), "stdlib": not saved.get("data_path")}
    try:
        from launcher.config import RunConfig

        settings["data"] = RunConfig.read(path).resolved_data_path
    except (UsageError, TypeError, ValueError) as err:
        logger.warning("cannot read the run settings in %s (%s)", path, err)
    return settings


def evaluate_checkpoint(checkpoint: str | Path, data: Sequence | None = None, tasks: Sequence[str] | None = None,
                        *, split: str | None = None, output: str | Path | None = None, device="cpu",
                        threads: int | None = None, **options) -> dict:
    """Load a checkpoint (a run folder, its checkpoints folder or a tag folder; any expert-parallel size),
    evaluate it (see evaluate_model for `options`) and merge the results into `output` (default
    <tag folder>/evaluation.json). Returns this evaluation's results, with "results_file".

    data None: the run's own data, when it can be found; tasks None: the project's stdlib tasks when the run
    trained on the embedded corpus, else none. split None: the run's split.
    """
    import torch

    from launcher.evaluation.report import RESULTS_FILE, merge_results
    from launcher.training.checkpoint import (LATEST, TRAINER_STATE, find_checkpoint, load_for_inference,
                                              read_trainer_state)

    check_settings(options.get("limit"), options.get("batch_size", 16), tasks or ())
    if threads is not None and threads < 1:
        raise UsageError(f"--threads: got {threads}; allowed: an integer >= 1")
    found = find_checkpoint(checkpoint)
    if found is None:
        raise UsageError(f"{checkpoint}: no complete checkpoint (a run folder, a checkpoints folder with a "
                         f"'{LATEST}' file, or a tag folder with {TRAINER_STATE})")
    tag_dir = found[0] / found[1]
    run = _run_settings(tag_dir)
    split = split or run.get("split") or "98,2,0"
    if data is None:
        from launcher.data.indexed import exists

        data = [run["data"]] if run.get("data") and exists(run["data"]) else []
        if run.get("data") and not data:
            logger.warning("the run's data %s is not here; give --data to evaluate a loss", run["data"])
    if tasks is None:
        tasks = [STDLIB_TASKS] if run.get("stdlib") else []
    if not data and not tasks and not options.get("lm_eval_tasks"):
        raise UsageError(f"{checkpoint}: nothing to evaluate; give --data (an indexed prefix or text/jsonl files) "
                         "or --tasks (task files, or stdlib)")
    if STDLIB_TASKS in tasks and run.get("stdlib"):
        from launcher.data.gpt_dataset import parse_split
        from launcher.evaluation.stdlib_tasks import DEFAULT_SPLIT

        if parse_split(split)[0] > parse_split(DEFAULT_SPLIT)[0]:
            logger.warning("this run trained on %.1f%% of the corpus: some stdlib task files (held out by %s) "
                           "were in its training data", 100 * parse_split(split)[0], DEFAULT_SPLIT)

    if threads is not None:
        torch.set_num_threads(threads)
    model, tokenizer, tag_dir = load_for_inference(tag_dir, device)
    results = evaluate_model(model, tokenizer, data, tasks, split=split, device=device, **options)
    state = read_trainer_state(tag_dir)
    results = {"checkpoint": str(tag_dir.resolve()), "iteration": state.get("iteration"),
               "tokens": state.get("tokens"), **results}
    path = Path(output) if output is not None else tag_dir / RESULTS_FILE
    merge_results(path, results)
    return {**results, "results_file": str(path)}
