"""experiments/benchmark.py: its FLOP count by hand, bad input, and a tiny end-to-end run."""

import mmap
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from configs import default
from experiments import benchmark
from tied_lm import data, train
from tied_lm.errors import UserError
from tied_lm.train import distinct_targets_bound

REPO = benchmark.REPO


def test_step_flops_counts_the_matmuls_by_hand():
  config = default.get_config()
  config.num_steps = 3
  config.model.embed_dim = config.model.hidden_size = 4
  config.model.num_layers = 1
  # Per token: the fused gates 2·(4 + 4)·16 = 256, the tied logits 2·4·10 = 80.
  flops = benchmark.step_flops(config, vocab_size=10, batch_size=2, eval_batch_size=1)
  # 6 tokens: 3x the forward (336 each), plus 3x the target scores L[y] Lᵀ (80 each).
  assert flops == {"train": 3 * 6 * 336 + 3 * 6 * 80, "train_lstm": 3 * 6 * 256,
                   "train_output": 3 * 6 * 80 + 3 * 6 * 80, "eval": 3 * 336,
                   "eval_lstm": 3 * 256, "eval_output": 3 * 80}
  # ỹ once per distinct target word: 4 rows of scores instead of 6.
  assert benchmark.step_flops(config, 10, 2, 1, target_rows=4)["train"] == (
      3 * 6 * 336 + 3 * 4 * 80)
  config.loss.stop_gradient_target = True  # ỹ a constant: its scores only run forward
  assert benchmark.step_flops(config, 10, 2, 1)["train"] == 3 * 6 * 336 + 6 * 80
  config.loss.augmented = False
  assert benchmark.step_flops(config, 10, 2, 1)["train"] == 3 * 6 * 336


def test_step_flops_of_two_layers_a_projection_and_an_untied_output_by_hand():
  config = default.get_config()
  config.num_steps, config.model.num_layers = 3, 2
  config.model.embed_dim, config.model.hidden_size = 4, 6
  config.model.tie_embeddings = config.model.output_projection = True
  # Per token: layer 0 2·(4 + 6)·24 = 480, layer 1 2·(6 + 6)·24 = 576, the projection
  # 2·6·4 = 48 and the tied logits 2·4·10 = 80: 1,184 forward; the target scores 80.
  flops = benchmark.step_flops(config, vocab_size=10, batch_size=2, eval_batch_size=1)
  assert flops == {"train": 3 * 6 * (1184 + 80), "train_lstm": 3 * 6 * (480 + 576),
                   "train_output": 3 * 6 * (48 + 80 + 80), "eval": 3 * 1184,
                   "eval_lstm": 3 * (480 + 576), "eval_output": 3 * (48 + 80)}
  # VD: untied, no projection, the logits 2·6·10 = 120 from h; no augmented loss.
  config.model.tie_embeddings = config.model.output_projection = False
  config.loss.augmented = False
  flops = benchmark.step_flops(config, vocab_size=10, batch_size=2, eval_batch_size=1)
  assert (flops["train"], flops["eval"]) == (3 * 6 * 1176, 3 * 1176)


def test_ratios_vs_torch_are_ours_over_theirs_with_the_paired_spread():
  row = {"train": {"tokens_per_second": 300.0, "repeat_seconds": [1.0, 2.0]},
         "torch_train": {"tokens_per_second": 200.0, "repeat_seconds": [1.5, 2.0]},
         "eval": {"tokens_per_second": 50.0, "repeat_seconds": [1.0]}}  # eval without torch
  assert benchmark.ratios_vs_torch(row) == {
      "train_ratio_vs_torch": 1.5, "train_ratio_vs_torch_range": [1.0, 1.5]}


def test_a_step_on_several_gpus_is_measured_against_all_their_peaks():
  # Host devices share the CPU's cores; GPUs each bring their own.
  assert benchmark.peak_fraction(60.0, 100.0, num_devices=4, platform="cpu") == 0.6
  assert benchmark.peak_fraction(60.0, 100.0, num_devices=4, platform="gpu") == 0.15
  assert benchmark.peak_fraction(60.0, 100.0, num_devices=1, platform="gpu") == 0.6


def test_the_matmul_peak_is_its_flops_over_the_fastest_of_its_timings(monkeypatch):
  # Five timed products of 0.5, 0.25, 1.0, 0.75 and 2.0 s by this clock (start, end pairs).
  clock = iter([0.0, 0.5, 1.0, 1.25, 2.0, 3.0, 4.0, 4.75, 5.0, 7.0])
  monkeypatch.setattr(benchmark.time, "perf_counter", lambda: next(clock))
  assert benchmark.measure_matmul_peak(8) == 2 * 8**3 / 0.25


def test_step_matmuls_run_the_recurrence_one_time_step_at_a_time():
  config = default.get_config()
  config.num_steps = 3
  config.model.embed_dim = config.model.hidden_size = 4
  config.model.num_layers = 1
  matmuls = {mm.name: mm for mm in benchmark.step_matmuls(config, vocab_size=10, batch_size=2)}
  # (count, m, k, n): 3 time steps of [2, 4] x [4, 16], then back; one weight gradient.
  assert matmuls["layer 0 recurrent"][2:] == (3, 2, 4, 16)
  assert matmuls["layer 0 recurrent, input gradient"][2:] == (3, 2, 16, 4)
  assert matmuls["layer 0 recurrent, weight gradient"][2:] == (1, 4, 6, 16)
  assert matmuls["logits"][2:] == (1, 6, 4, 10)
  assert matmuls["target scores, weight gradient"][2:] == (1, 4, 6, 10)
  assert [name for name, mm in matmuls.items() if mm.block == "output"] == [
      "logits", "logits, input gradient", "logits, weight gradient",
      "target scores", "target scores, input gradient", "target scores, weight gradient"]


def test_load_config_applies_overrides_with_the_fields_types():
  config = benchmark.load_config("configs/ptb.py:small,real",
                                 ["model.unroll=5", "loss.tau=2", "model.output_bias=True"])
  assert config.model.unroll == 5 and isinstance(config.model.unroll, int)
  assert config.loss.tau == 2.0 and isinstance(config.loss.tau, float)
  assert config.model.output_bias is True
  # Numbers as tied_lm.main's --config.KEY=VALUE reads them: these were refused as not JSON.
  config = benchmark.load_config("configs/ptb.py:small,real",
                                 ["loss.tau=.5", "optim.learning_rate=1.", "loss.gamma=inf"])
  assert (config.loss.tau, config.optim.learning_rate, config.loss.gamma) == (
      0.5, 1.0, float("inf"))
  # And as it reads ints and bools: 0x10 was refused as not an int.
  config = benchmark.load_config("configs/ptb.py:small,real",
                                 ["model.unroll=0x10", "model.output_bias=t", "seed=-3"])
  assert (config.model.unroll, config.model.output_bias, config.seed) == (16, True, -3)


@pytest.mark.parametrize("spec, overrides, message", [
    ("configs/nope.py:small", [], "no file configs/nope.py"),
    ("configs/ptb.py:small,real", ["model.nope=1"], "KEY a config field"),
    ("configs/ptb.py:small,real", ["model.unroll"], "KEY a config field"),
    ("configs/ptb.py:small,real", ["model=3"], "KEY a config field"),
    ("configs/ptb.py:small,real", ["model.unroll=x"], "'x' is not of type int"),
    ("configs/ptb.py:small,real", ["model.output_bias=yes"], "'yes' is not of type bool"),
    ("configs/ptb.py:small,tied", [], "'configs/ptb.py:small,tied': config argument"),
    ("configs/ptb.py:small,real", ["model.unroll=2.5"], "'2.5' is not of type int"),
    ("configs/ptb.py:small,real", ["loss.tau=true"], "'true' is not of type float"),
    ("configs/ptb.py:small,real", ["seed=1.9"], "'1.9' is not of type int"),
    ("configs/default.py:small,real", [], "'configs/default.py:small,real': "),
])
def test_load_config_refuses_bad_input_in_one_line(spec, overrides, message):
  with pytest.raises(UserError, match=message):
    benchmark.load_config(spec, overrides)


def test_benchmark_writes_its_rows_with_provenance(run_tiny_timing):
  stdout, results = run_tiny_timing("benchmark")
  assert results["complete"] and results["commit"] and results["versions"]["jax"]
  (row,) = results["rows"]
  train = row["train"]
  assert len(train["repeat_seconds"]) == 2 and train["minor_faults_per_step"] >= 0
  tokens = row["batch_size"] * row["num_steps"]
  assert abs(train["tokens_per_second"] * train["step_ms"] / 1e3 - tokens) < 1e-6 * tokens
  # The step scores ỹ once per distinct target word, as training does.
  windows = data.train_windows(
      data.load_corpus("ptb").train, row["batch_size"], row["num_steps"])[1]
  assert 0 < row["target_rows"] == distinct_targets_bound(windows, 1) < tokens
  assert row["train_flops_per_step"] == benchmark.step_flops(
      default.get_config(), row["vocab_size"], row["batch_size"], 10, row["target_rows"])["train"]
  assert row["eval"]["tokens_per_second"] > 0
  # The peak is the best of the measurements before and after the one config.
  samples = results["matmul_peak_samples"]["jax"]
  assert len(samples) == 2 and results["matmul_peak_flops"]["jax"] == max(samples)
  for kind in ("train", "eval"):
    assert row[kind]["achieved_flops"] == pytest.approx(
        row[f"{kind}_flops_per_step"] / (row[kind]["step_ms"] / 1e3))
    assert row[kind]["peak_fraction"] == pytest.approx(
        row[kind]["achieved_flops"] / max(samples))
  assert "configs/default.py" in stdout  # the printed table


def test_benchmark_times_torch_beside_ours_on_the_same_loss(run_tiny_timing):
  pytest.importorskip("torch")
  results = run_tiny_timing("benchmark", "--compare=torch")[1]
  assert results["versions"]["torch"]
  assert set(results["matmul_peak_flops"]) == set(results["matmul_peak_samples"]) == {
      "jax", "torch"}
  (row,) = results["rows"]
  assert row["torch_loss_relative_difference"] < 1e-6
  assert row["torch_logits_relative_difference"] < 1e-5
  for kind, tokens in (("train", row["batch_size"] * row["num_steps"]),
                       ("eval", 10 * row["num_steps"])):
    theirs = row[f"torch_{kind}"]
    assert len(theirs["repeat_seconds"]) == 2
    assert abs(theirs["tokens_per_second"] * theirs["step_ms"] / 1e3 - tokens) < 1e-6 * tokens
  assert {key: row[key] for key in row if "ratio_vs_torch" in key} == (
      benchmark.ratios_vs_torch(row))
  assert set(benchmark.ratios_vs_torch(row)) == {
      f"{kind}_ratio_vs_torch{suffix}" for kind in ("train", "eval") for suffix in ("", "_range")}


def tiny_run_to_check():
  """(config, corpus, params at init) of configs/default.py over a 300-word corpus."""
  config = default.get_config()
  vocab = tuple(f"w{i}" for i in range(300))
  ids = np.random.default_rng(0).integers(0, len(vocab), 200).astype(np.int32)
  model = train.make_model(config, len(vocab))
  params = train.create_train_state(config, model, steps_per_epoch=1).params
  return config, data.Corpus(vocab, ids, ids[:5], ids[:5]), params


@pytest.mark.parametrize("embedding_scale,message", [
    (1.1, "logits other than ours"),  # the loss moves by under 1e-4: logits tell
    (None, "logits other than ours"),  # torch's own initialisation
])
def test_a_torch_reference_that_computes_another_function_is_refused(
    embedding_scale, message, monkeypatch):
  torch = pytest.importorskip("torch")
  torch_reference = pytest.importorskip("experiments.torch_reference")
  config, corpus, params = tiny_run_to_check()
  differences = benchmark.check_torch_matches(config, corpus, params, "cpu")
  assert max(differences.values()) < 1e-5
  load = torch_reference.load_flax_params

  def load_otherwise(reference, params):
    if embedding_scale is not None:
      load(reference, params)
      with torch.no_grad():
        reference.embed.weight.mul_(embedding_scale)

  monkeypatch.setattr(torch_reference, "load_flax_params", load_otherwise)
  torch.manual_seed(0)
  with pytest.raises(UserError, match=f"{message} .* would not compare the same work"):
    benchmark.check_torch_matches(config, corpus, params, "cpu")


def test_the_torch_check_compares_the_loss_where_the_logits_agree(monkeypatch):
  # A reference without the augmented term would time less work. (The loss's exact
  # value and gradients are test_torch_reference.py's.)
  torch_reference = pytest.importorskip("experiments.torch_reference")
  config, corpus, params = tiny_run_to_check()
  loss_terms = torch_reference.loss_terms

  def without_the_augmented_term(*args):
    *rest, loss_config = args
    loss_config = loss_config.copy_and_resolve_references()
    loss_config.augmented = False
    return loss_terms(*rest, loss_config)

  monkeypatch.setattr(torch_reference, "loss_terms", without_the_augmented_term)
  with pytest.raises(UserError, match="a loss other than ours"):
    benchmark.check_torch_matches(config, corpus, params, "cpu")


def test_every_call_runs_a_timed_calls_windows_so_our_evaluator_compiles_only_first(
    monkeypatch):
  # evaluate compiles one program per windows-per-call: a 1-window first call and a
  # 3-window warm-up left the first timed repeat (10 windows) to compile.
  monkeypatch.setattr(benchmark, "FLAGS",
                      SimpleNamespace(steps_per_repeat=4, warmup=1, repeats=3))
  config = default.get_config()
  config.model.embed_dim = config.model.hidden_size = 8
  model = train.make_model(config, 50)
  params = train.create_train_state(config, model, steps_per_epoch=1).params
  ids = np.random.default_rng(0).integers(0, 50, 4 * 2 * 5 + 1).astype(np.int32)

  class Recording:
    def __init__(self):
      self.evaluator = benchmark.OurEvaluator(model, params, ids, batch_size=2, num_steps=5)
      self.calls = []  # (windows, compiled eval programs after the call)

    def run(self, num_steps):
      self.evaluator.run(num_steps)
      self.calls.append((num_steps, train.eval_step._cache_size()))

  runner = Recording()
  stats, _ = benchmark.benchmark_pair(runner, None, tokens_per_step=2 * 5)
  assert [windows for windows, _ in runner.calls] == [4] * (1 + 1 + 3)
  assert len({compiled for _, compiled in runner.calls}) == 1
  assert len(stats["repeat_seconds"]) == 3
  assert stats["compile_seconds"] == max(
      stats["first_call_seconds"] - sorted(stats["repeat_seconds"])[1], 0.0)


def test_time_runner_counts_the_pages_a_step_maps_in():
  class TouchesFreshPages:
    def run(self, num_steps):
      for _ in range(num_steps):
        memory = mmap.mmap(-1, 256 * mmap.PAGESIZE)  # new, unmapped pages each time
        for page in range(256):
          memory[page * mmap.PAGESIZE] = 1
        memory.close()

  seconds, faults = benchmark.time_runner(TouchesFreshPages(), 4)
  assert seconds > 0 and 4 * 256 <= faults < 4 * 256 + 200


@pytest.mark.parametrize("module, flags, message", [
    ("benchmark", ["--batch_sizes=20,x"], "must be a comma-separated list of positive integers"),
    ("benchmark", ["--num_devices=3"], "--num_devices=3: only 2 local devices"),
    ("benchmark", ["--batch_sizes=21", "--num_devices=2"],
     "batch_size=21 is not divisible by the 2 devices"),
    ("profile_step", ["--num_devices=2"], "profile_step times one device"),
    ("profile_step", ["--batch_sizes=0"], "must be a comma-separated list of positive integers"),
    ("benchmark", ["--num_devices="], "needs at least one value"),
    ("benchmark", ["--num_devices=1,"], "--num_devices=['1', '']: has an empty entry (two commas"),
    # More windows per timed call than the split has: the step time would be overstated.
    ("benchmark", ["--batch_sizes=8192"], "batch 8192: the train split has 5 windows, fewer "
     "than the 10 each timed call runs"),
    ("profile_step", ["--eval_batch_size=1000"], "--eval_batch_size=1000 needs 200,001 "
     "validation tokens for 10 windows per timed call; the split has 73,760"),
    ("benchmark", ["--output={tmp_path}"], "is a folder; name a JSON file in it"),
    ("benchmark", ["--batch_sizes=²"], "must be a comma-separated list of positive integers"),
    ("benchmark", ["--configs=README.md"], "config 'README.md': SyntaxError: "),
    ("benchmark", ["--configs=configs/__init__.py"],
     "config 'configs/__init__.py': the file defines no get_config()"),
    ("profile_step", ["--output=/dev/null/x.json"], "cannot write the folder of --output "
     "/dev/null: /dev/null is not a directory"),
])
def test_bad_timing_flags_are_one_line_before_any_timing(module, flags, message, tmp_path,
                                                        run_module):
  output = tmp_path / "out.json"
  result = run_module(f"experiments.{module}", "--configs=configs/default.py",
                      f"--output={output}", *(f.format(tmp_path=tmp_path) for f in flags),
                      timeout=120)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
  assert not output.exists()


@pytest.mark.parametrize("module", ["benchmark", "profile_step"])
def test_compare_torch_without_torch_is_one_line(module, tmp_path):
  # A stand-in for an install without the bench extra. It was a ModuleNotFoundError
  # traceback, after the corpus had loaded.
  (tmp_path / "torch").mkdir()
  (tmp_path / "torch" / "__init__.py").write_text(
      "raise ModuleNotFoundError(\"No module named 'torch'\")\n")
  result = subprocess.run(
      [sys.executable, "-m", f"experiments.{module}", "--configs=configs/default.py",
       "--compare=torch", f"--output={tmp_path / 'out.json'}"],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, PYTHONPATH=os.pathsep.join(
          [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])])))
  assert (result.returncode, result.stderr.strip()) == (
      2, 'error: flag --compare=torch: needs PyTorch, an optional extra: pip install -e '
      '".[bench]"')


@pytest.mark.parametrize("module", ["benchmark", "profile_step"])
def test_an_output_that_would_be_a_runs_own_file_is_refused(module, tmp_path, run_module):
  # --output=RUN/results.json replaced the run's results; tied_lm.summarize then refused it.
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "config.json").write_text("{}")
  output = tmp_path / "run" / "results.json"
  result = run_module(f"experiments.{module}", "--configs=configs/default.py",
                      f"--output={output}", timeout=120)
  assert (result.returncode, result.stderr.strip()) == (
      2, f"error: --output={output} would write {output} into a run's directory, under the "
      "name of a run's own file; name another file")
  assert not output.exists()
