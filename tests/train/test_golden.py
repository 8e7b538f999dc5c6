"""The golden loss curve: the nano reference run's first 20 losses against tests/train/golden_nano_losses.json
(how the run is made and why it is the same on every machine: golden.py)."""
import json

import pytest
from golden import GOLDEN, ITERATIONS, POSITIONAL, RTOL, compare, run_losses

pytestmark = pytest.mark.slow


def test_golden_loss_curve(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    assert (golden["run"], len(golden["lm_loss"])) == (POSITIONAL, ITERATIONS), f"{GOLDEN.name} is for another run"
    off = compare(golden["lm_loss"], run_losses(tmp_path))
    assert not off, (
        f"the nano reference run ({POSITIONAL}) no longer trains to the losses in {GOLDEN.name} "
        f"(relative tolerance {RTOL}):\n  " + "\n  ".join(off) + "\n"
        "Something changed the numerics: data order, tokenization, init, routing, the optimizer or the schedule. "
        "If that is deliberate, regenerate with `make golden` and commit the file on its own, saying why.")


def test_compare_names_each_iteration_that_moved_beyond_the_tolerance():
    within = 4.0 * (1 + RTOL / 2)
    assert compare([5.0, 4.0, 3.0], [5.0, within, 3.1]) == [
        "iteration 3: golden 3.000000, this run 3.100000 (+3.33e-02)"]
