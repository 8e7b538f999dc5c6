"""Evaluation results: merged into one JSON file per checkpoint (atomically), and a table for people."""
from __future__ import annotations

import json
import math
from pathlib import Path

from launcher.files import write_json_atomic

RESULTS_FILE = "evaluation.json"
SECTIONS = ("validation", "tasks", "lm_eval")


def merge_results(path: str | Path, new: dict) -> dict:
    """`new` laid over what `path` holds (entry by entry within each section), written atomically: the
    results of several evaluations of one checkpoint accumulate in one file."""
    path = Path(path)
    try:
        old = json.loads(path.read_text())
        old = old if isinstance(old, dict) else {}
    except (OSError, ValueError):
        old = {}
    merged = {**old, **{k: v for k, v in new.items() if k not in SECTIONS}}
    for section in SECTIONS:
        entries = {**(old.get(section) or {}), **(new.get(section) or {})}
        if entries:
            merged[section] = entries
    write_json_atomic(merged, path)
    return merged


def _number(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return [line(header), *(line(r) for r in rows)]


def format_results(results: dict) -> str:
    """A readable summary of what `evaluate_model` returned."""
    out = []
    if results.get("checkpoint"):
        out.append(f"checkpoint {results['checkpoint']} (iteration {results.get('iteration', '?')})")
    validation = results.get("validation") or {}
    if validation:
        rows = [[name, _number(v.get("tokens")), _number(v["loss"]), _number(v["perplexity"], 2),
                 _number(v.get("bits_per_byte"))] for name, v in validation.items()]
        out += ["", *_table(["data", "tokens", "loss", "perplexity", "bits/byte"], rows)]
    tasks = results.get("tasks") or {}
    if tasks:
        rows = []
        for name, t in tasks.items():
            acc = f"{_number(t['acc'])} ± {_number(t['acc_stderr'])}"
            if t["kind"] == "multiple_choice":
                rows.append([name, "choice", _number(t["examples"]), acc, _number(t["acc_norm"]),
                             _number(t["acc_per_token"]), "-", _number(t["chance"])])
            else:
                rows.append([name, "completion", _number(t["examples"]), acc, "-", "-",
                             _number(t["target_loglikelihood"]), _number(t["chance"])])
        out += ["", *_table(["task", "kind", "n", "acc", "acc_norm", "acc/token", "target ll", "chance"], rows),
                "acc_norm: log-likelihood per character of the choice (lm-eval's); acc/token: per token; "
                "target ll: mean log p(target), nats"]
    harness = results.get("lm_eval") or {}
    if harness:
        rows = [[name, _number(m.get("examples")), _number(m.get("acc")), _number(m.get("acc_norm")),
                 _number(m.get("perplexity"), 2)] for name, m in harness.items()]
        out += ["", "lm-eval:", *_table(["task", "n", "acc", "acc_norm", "perplexity"], rows)]
    return "\n".join(out)
