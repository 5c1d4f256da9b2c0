"""python -m experiments.subspace_distance: bad flags are one-line errors, before any training."""

import pytest


@pytest.mark.parametrize(("flag", "message"), [
    ("--betas=x", "error: --betas, --taus and --seeds take numbers: "
                  "could not convert string to float: 'x'\n"),
    ("--betas=1.5", "error: every β must be in [0, 1] and every τ > 0\n"),
    ("--num_words=1", "error: --num_words=1 must be at least 2\n"),
])
def test_bad_flags_are_one_line_errors(flag, message, tmp_path, run_module):
  result = run_module("experiments.subspace_distance", flag, f"--output={tmp_path / 'out'}")
  assert result.returncode == 2
  assert result.stderr == message
  assert list(tmp_path.iterdir()) == []
