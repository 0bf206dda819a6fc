"""What `tokenprune flops` and `bench` do with options they cannot run: one line, exit 2, no traceback, before
anything is counted or timed. (`show`: tests/test_visualize.py; eval's own inputs: tests/test_eval_inputs.py.)"""
from __future__ import annotations

import pytest
from test_eval_inputs import one_line_error


@pytest.mark.parametrize("command", ["flops", "bench", "eval"])
def test_keep_as_an_option_points_at_the_keep_flag(capsys, command):
    one_line_error([command, "--method", "tome", "-o", "keep=0.5"], capsys, "'keep=0.5': keep is not a method option",
                   "--keep 0.5")
