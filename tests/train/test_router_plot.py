"""python -m launcher.plot_router: the router's balance over a run, read from metrics.jsonl."""
from __future__ import annotations

import json

import pytest

from launcher.plot_router import main, read_expert_records


def _write_metrics(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _train(iteration, dropped, load):
    return {"kind": "train", "iteration": iteration, "lm_loss": 5.0,
            "experts": {str(layer): {"imbalance": max(load) * len(load), "dropped": dropped,
                                     "entropy": 1.9, "load": load} for layer in (1, 3)}}


def test_plot_router_writes_a_png_from_the_expert_records(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _write_metrics(run / "metrics.jsonl", [
        _train(10, 0.8, [0.9, 0.05, 0.03, 0.02]),
        {"kind": "valid", "iteration": 10, "loss": 6.0, "ppl": 400.0},
        _train(20, 0.1, [0.3, 0.25, 0.25, 0.2]),
        _train(30, 0.02, [0.25, 0.25, 0.25, 0.25]),
    ])
    records = read_expert_records(run / "metrics.jsonl")
    assert [it for it, _ in records] == [10, 20, 30] and sorted(records[0][1]) == [1, 3]
    assert records[2][1][3]["dropped"] == pytest.approx(0.02)
    assert main([str(run)]) == 0
    png = (run / "router.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    out = tmp_path / "elsewhere" / "r.png"
    assert main([str(run / "metrics.jsonl"), "-o", str(out)]) == 0 and out.is_file()


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    ('{"kind": "train", "iteration": 1, "lm_loss": 5.0}\n', "no training record with expert statistics"),
    ("not json\n", "metrics.jsonl:1: not a JSON line"),
])
def test_plot_router_refuses_bad_input_in_one_line(tmp_path, capsys, content, message):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "router.png").exists()
