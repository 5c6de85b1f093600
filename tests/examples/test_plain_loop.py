"""The plain-loop example keeps working: it trains, scores on its schedule and freezes from its own calls."""

import re

import pytest
from tiny_models import load_example


@pytest.fixture(scope="module")
def plain_loop():
    return load_example("plain_loop")


def test_plain_loop_example_freezes_units_through_update_and_freeze(plain_loop, capsys):
    # 128 rows / batch 32 = 4 steps per epoch, 3 epochs = 12 steps; t_f = 7, scoring every 2 steps
    plain_loop.main(["--tiny", "--train-size", "128", "--epochs", "3", "--score-every", "2", "--tau", "0.9"])
    out = capsys.readouterr().out
    assert "trained 12 steps" in out
    froze = re.findall(r"step (\d+): froze", out)
    assert froze, out
    assert all(int(step) % 2 == 0 for step in froze)  # only at scoring steps
    last = re.search(r"epoch 3: loss [\d.]+, frozen (\d+)/6", out)
    assert last and int(last.group(1)) >= 1
