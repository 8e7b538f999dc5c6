"""examples/compare.py (`make compare`): the compute-to-target arithmetic and its argument check; the
trainings it drives are the launch script's, tested elsewhere."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "compare.py"


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_flops_to_reach_interpolates_in_log_flops(compare):
    curve = [(1.0, 5.0), (10.0, 4.0), (100.0, 3.0)]
    assert compare.flops_to_reach(curve, 3.5) == pytest.approx(math.sqrt(10 * 100))  # halfway in log FLOPs
    assert compare.flops_to_reach(curve, 4.0) == pytest.approx(10.0)
    assert compare.flops_to_reach(curve, 6.0) == 1.0  # reached at the first evaluation
    assert compare.flops_to_reach(curve, 2.0) is None


def test_compute_to_target_is_dense_flops_over_moe_flops_to_the_dense_final_loss(compare):
    dense = {"curve": [(1.0, 5.0), (100.0, 3.5)]}
    moe = {"curve": [(1.0, 5.0), (10.0, 4.0), (100.0, 3.0)]}
    ratio, reached = compare.compute_to_target(dense, moe)
    assert reached and ratio == pytest.approx(100 / math.sqrt(1000))
    worse = {"curve": [(1.0, 5.0), (50.0, 3.8)]}
    ratio, reached = compare.compute_to_target(dense, worse)
    assert not reached and ratio == pytest.approx(2.0)  # not reached: its whole budget, so at most 2x


def test_too_few_tokens_is_one_line(compare, capsys):
    assert compare.main(["--tokens", "1000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --tokens: got 1000") and len(err.strip().splitlines()) == 1


def _row(compare, key, seed, final, scale=1.0):
    model = next(m for m in compare.MODELS if m.key == key)
    curve = [(1e12 * scale * i, final + 3.0 / i) for i in range(1, 9)]
    return {"key": key, "label": model.label, "seed": seed, "color": model.color, "total_params": 3.2e6,
            "active_params": 1.3e6 * scale, "flops": curve[-1][0], "tokens": 1e6, "valid_loss": final + 0.01,
            "curve": curve, "tasks": {"stdlib_next_line": 0.4, "stdlib_last_identifier": 0.2}, "wall_s": 600.0,
            "load": 3.0}


def test_report_and_plot_of_a_partial_comparison(compare, tmp_path):
    """Two seeds of the pair, one other model: the table, the headline figures, what was not run, a PNG."""
    rows = [_row(compare, "dense", 1234, 4.0), _row(compare, "dense", 4321, 4.03),
            _row(compare, "moe8-top1", 1234, 3.9), _row(compare, "moe8-top1", 4321, 3.95),
            _row(compare, "dense-2x", 1234, 3.8, scale=2.0)]
    summary = compare.analyse(rows)
    assert summary["seeds"] == [1234, 4321]
    assert summary["moe_minus_dense"] == pytest.approx([-0.1, -0.08])
    assert summary["dense_seed_spread"] == pytest.approx(0.03) and set(summary["others"]) == {"dense-2x"}
    assert summary["diff_seed_spread"] == pytest.approx(0.02)  # the paired differences: -0.10 and -0.08
    assert all(r > 1 for r in summary["ratio"]) and all(summary["ratio_reached"])

    class Args:
        tokens = 1_024_000

    text = compare.report(rows, summary, Args, {"date": "today", "load": 2.0}, {"load": 2.5})
    assert "| MoE-8 top-1 | 4321 | 3.20M | 1.30M |" in text and "next_line acc" in text
    assert "-0.100, -0.080 nats (seeds 1234, 4321; mean -0.090)" in text
    assert "of MoE-8 top-1 minus dense base (each seed's pair trains on the same sequences in the same order) 0.020 nats" in text
    assert "dense 2x (hidden 104)" in text and "Not run here: MoE-8 expert choice, MoE-8 top-2" in text
    compare.plot(rows, 4.0 + 3.0 / 8, tmp_path / "compare.png")
    assert (tmp_path / "compare.png").read_bytes().startswith(b"\x89PNG")

    one_seed = compare.analyse([r for r in rows if r["seed"] == 1234])
    assert one_seed["dense_seed_spread"] is None and one_seed["moe_minus_dense"] == pytest.approx([-0.1])
    assert one_seed["diff_seed_spread"] is None


def test_a_finished_run_is_reused_only_for_the_same_command(compare, tmp_path):
    """A run folder trained by this comparison's command is reused without training; one trained with other
    settings (an older base, other tokens) is an error naming it, not a silent mix of two comparisons."""
    import argparse
    import json

    args = argparse.Namespace(tokens=32_768, tokens_per_iter=2048, runs=tmp_path)
    model = next(m for m in compare.MODELS if m.key == "dense")
    run = tmp_path / compare.run_name(model, 1234)
    run.mkdir()
    record = {"tokens": 32_768, "wall_s": 12.0, "load": 1.0}
    (run / "compare_run.json").write_text(json.dumps(record))  # no command: written by an older comparison
    with pytest.raises(SystemExit, match="trained by another command"):
        compare.train(model, 1234, args)
    command = ["run", "2", "gpt2bpe", "tiny", "none", "0", "8", "1", "none", "none", "16", "--run-name", run.name,
               "--seed", "1234", "--split", compare.SPLIT, "--eval-interval", "1", "--eval-iters",
               str(compare.EVAL_ITERS), "--log-interval", "1", *model.flags]
    (run / "compare_run.json").write_text(json.dumps({**record, "command": command}))
    assert compare.train(model, 1234, args) == {"run": run, "wall_s": 12.0, "load": 1.0}
    args.tokens = 65_536  # other tokens: another command
    with pytest.raises(SystemExit, match="delete it to train it again"):
        compare.train(model, 1234, args)
