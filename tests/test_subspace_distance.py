"""python -m experiments.subspace_distance: bad flags are one-line errors, before any training."""

import pytest

TAU_ERROR = "error: every τ must be in [1.18e-38, 3.4e+38] (float32's positive normal numbers): "


@pytest.mark.parametrize(("flag", "message"), [
    ("--betas=x", "error: --betas, --taus and --seeds take numbers: "
                  "could not convert string to float: 'x'\n"),
    ("--betas=1.5", "error: every β must be in [0, 1]: 1.5\n"),
    ("--taus=nan", TAU_ERROR + "nan\n"),
    ("--taus=1e-39", TAU_ERROR + "1e-39\n"),
    ("--learning_rate=0", "error: --learning_rate=0.0 must be finite and > 0\n"),
    ("--hidden_size=0", "error: --hidden_size=0 must be at least 1\n"),
    ("--batch_size=0", "error: --batch_size=0 must be at least 1\n"),
    ("--num_steps=-1", "error: --num_steps=-1 must be at least 1\n"),
    # The range said [2, ...] while fewer than one batch, 720 words, failed later.
    ("--num_words=719", "error: --num_words=719 must be in [720, 929,589] (one batch of "
     "--batch_size rows of --num_steps + 1 words; PTB train's length)\n"),
    ("--num_words=2000000", "error: --num_words=2000000 must be in [720, 929,589] (one batch "
     "of --batch_size rows of --num_steps + 1 words; PTB train's length)\n"),
    ("--output=", "error: --output='' must be a file prefix, e.g. experiments/results/NAME\n"),
    # A repeated seed was trained again and counted twice in mean ± std.
    ("--seeds=0,0", "error: --seeds repeats a value: 0, 0\n"),
    ("--seeds=99999999999999999999", "error: every seed must be in [0, 2**32): "
     "99999999999999999999\n"),
])
def test_bad_flags_are_one_line_errors(flag, message, tmp_path, run_module):
  result = run_module("experiments.subspace_distance", f"--output={tmp_path / 'out'}", flag)
  assert result.returncode == 2
  assert result.stderr == message
  assert list(tmp_path.iterdir()) == []
