r"""Times tied_lm's train and eval steps, side by side with PyTorch if asked.

  python -m experiments.benchmark --configs=configs/ptb.py:small,real \
      --configs=configs/ptb.py:medium,real --compare=torch

For each config, batch size and device count it records the compile time, the
median tokens/s over timed repeats (after warm-up, synchronised on the
device), the memory XLA plans for the step (and the allocator's peak on
GPU/TPU, with torch's on CUDA), and the achieved matmul FLOP/s
(analytic count, see `step_flops`) as a fraction of the peak fp32 matmul
FLOP/s that it measures on the same device: the best of its measurements
before, between and after the configs, since this machine's speed drifts
within a run. With `--compare=torch` it first
checks that `experiments/torch_reference.py` computes the same logits and loss
on the same parameters (and stops if not), then alternates the two
implementations repeat by repeat and reports ours/torch. Results go to JSON
(hardware, versions, commit, command).

For 1 -> 2 host-device scaling on a CPU, run it with
XLA_FLAGS=--xla_force_host_platform_device_count=2 and --num_devices=1,2.
"""

import os
import re
import resource
import statistics
import time
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging

from tied_lm import data, errors, hostmem, models, provenance, train
from tied_lm.errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_multi_string(
    "configs", ["configs/ptb.py:small,real", "configs/ptb.py:medium,real"],
    "Config specs FILE:ARGS, as for --config of tied_lm.main.",
)
flags.DEFINE_list("batch_sizes", [], "Train batch sizes to time (default: each config's).")
flags.DEFINE_list("num_devices", ["1"], "Local device counts for the pmapped train step.")
errors.require_values("num_devices")
for _name in ("batch_sizes", "num_devices"):
  flags.register_validator(
      # isdigit() accepts "²", which int() refuses.
      _name, lambda values: all(re.fullmatch(r"[0-9]+", v) and int(v) > 0 for v in values),
      message="must be a comma-separated list of positive integers")
flags.DEFINE_integer("eval_batch_size", 10, "Batch size of the timed eval step.", lower_bound=1)
flags.DEFINE_enum("compare", "", ["", "torch"], "Also time the PyTorch reference.")


def _torch_importable(compare: str) -> bool:
  if compare != "torch":
    return True
  try:
    import torch  # noqa: F401
  except ImportError:
    return False
  return True


# Checked with the flags: torch is an optional extra, and was a traceback after the setup.
flags.register_validator(
    "compare", _torch_importable,
    message='needs PyTorch, an optional extra: pip install -e ".[bench]"')
flags.DEFINE_integer(
    "warmup", 1,
    "Untimed repeats before timing, after the first call (which compiles); each runs "
    "--steps_per_repeat steps, like a timed one.", lower_bound=0)
flags.DEFINE_integer("repeats", 5, "Timed repeats; the median is reported.", lower_bound=1)
flags.DEFINE_integer("steps_per_repeat", 10, "Steps per timed repeat.", lower_bound=1)
flags.DEFINE_integer("matmul_size", 4096, "N of the N x N x N fp32 matmul that sets the peak.",
                     lower_bound=1)
flags.DEFINE_multi_string("set", [], "Config overrides KEY=VALUE, e.g. model.unroll=2.")
flags.DEFINE_enum(
    "fp32_matmuls", "default", ["default", "strict"],
    "default: each library's own choice for fp32 matmuls (on NVIDIA GPUs JAX uses TF32, "
    "PyTorch full fp32 for matmuls and TF32 in cuDNN); strict: full fp32 in both.",
)
flags.DEFINE_string(
    "output", "",
    "JSON path (default experiments/results/benchmark_<platform>.json; profile_step: "
    "profile_<platform>.json).",
)

REPO = provenance.REPO


OVERRIDE_PARSERS = {bool: flags.BooleanParser(), int: flags.IntegerParser(),
                    float: flags.FloatParser(), str: flags.ArgumentParser()}


def load_config(spec: str, overrides: list[str]) -> ml_collections.ConfigDict:
  """'configs/ptb.py:medium,real' -> its get_config(args), with KEY=VALUE overrides."""
  path, _, args = spec.partition(":")
  if not (REPO / path).is_file():
    raise UserError(f"config {spec!r}: no file {path} in {REPO}")
  namespace: dict[str, Any] = {}
  try:
    source = (REPO / path).read_text()
    exec(compile(source, path, "exec"), namespace)  # noqa: S102 -- our own config files
  except Exception as error:  # noqa: BLE001 -- whatever the file raises, one line
    raise UserError(f"config {spec!r}: {type(error).__name__}: {error}") from None
  if "get_config" not in namespace:
    raise UserError(f"config {spec!r}: the file defines no get_config()")
  try:
    config = namespace["get_config"](args) if args else namespace["get_config"]()
  except (ValueError, KeyError, TypeError) as error:  # TypeError: a get_config of other args
    raise UserError(f"config {spec!r}: {error}") from None
  for override in overrides:
    key, equals, value = override.partition("=")
    node = config
    *parents, leaf = key.split(".")
    try:
      for parent in parents:
        node = node[parent]
      kind = type(node[leaf])
    except (KeyError, TypeError):
      kind = None
    if not equals or kind is None or issubclass(kind, ml_collections.ConfigDict):
      raise UserError(f"--set {override!r} must be KEY=VALUE with KEY a config field, "
                      "e.g. model.unroll=5")
    try:
      # ml_collections' parsers for --config.KEY=VALUE, so that a value means here what it
      # means to tied_lm.main (true/t/1, .5, 1e-3, inf, 0x10; an int field refuses 2.5).
      node[leaf] = OVERRIDE_PARSERS[kind].parse(value)
    except (ValueError, TypeError, KeyError):
      raise UserError(f"--set {override!r}: {value!r} is not of type {kind.__name__}") from None
  return config


class Matmul(NamedTuple):
  """`count` products [m, k] @ [k, n] of one train step; count > 1 is a recurrence,
  each product's input depending on the one before."""

  block: str  # "lstm" or "output" (projection, logits, target scores)
  name: str
  count: int
  m: int
  k: int
  n: int

  @property
  def flops(self) -> int:
    return 2 * self.count * self.m * self.k * self.n


def step_matmuls(
    config: ml_collections.ConfigDict, vocab_size: int, batch_size: int, target_rows: int = 0
) -> list[Matmul]:
  """The matmuls of one train step, in the shapes our step runs them.

  Each forward product y = x w of the step has its input gradient and its
  weight gradient. In the LSTM the recurrent products run one time step at a
  time, [B, H] x [H, 4H] forward and [B, 4H] x [4H, H] backward, and the
  recurrent weight gradient is one product over all tokens. The augmented loss
  adds the target scores L[y] Lᵀ, with gradients unless ỹ is a constant, over
  `target_rows` rows (all devices' distinct target words, `OurTrainer.target_rows`;
  0: one per token).
  """
  m = config.model
  tokens, gates = batch_size * config.num_steps, 4 * m.hidden_size

  def forward_and_gradients(block, name, rows, inputs, outputs):
    return [Matmul(block, name, 1, rows, inputs, outputs),
            Matmul(block, f"{name}, input gradient", 1, rows, outputs, inputs),
            Matmul(block, f"{name}, weight gradient", 1, inputs, rows, outputs)]

  matmuls = []
  for layer in range(m.num_layers):
    width = m.embed_dim if layer == 0 else m.hidden_size
    matmuls += forward_and_gradients("lstm", f"layer {layer} input", tokens, width, gates)
    matmuls += [
        Matmul("lstm", f"layer {layer} recurrent", config.num_steps,
               batch_size, m.hidden_size, gates),
        Matmul("lstm", f"layer {layer} recurrent, input gradient", config.num_steps,
               batch_size, gates, m.hidden_size),
        Matmul("lstm", f"layer {layer} recurrent, weight gradient", 1,
               m.hidden_size, tokens, gates),
    ]
  if m.tie_embeddings and m.hidden_size != m.embed_dim:
    matmuls += forward_and_gradients(
        "output", "projection", tokens, m.hidden_size, m.embed_dim
    )
  output_width = m.embed_dim if m.tie_embeddings else m.hidden_size
  matmuls += forward_and_gradients("output", "logits", tokens, output_width, vocab_size)
  if config.loss.augmented:
    scores = forward_and_gradients(
        "output", "target scores", target_rows or tokens, m.embed_dim, vocab_size)
    matmuls += scores[:1] if config.loss.stop_gradient_target else scores
  return matmuls


def step_flops(
    config: ml_collections.ConfigDict, vocab_size: int, batch_size: int, eval_batch_size: int,
    target_rows: int = 0,
) -> dict:
  """Matmul FLOPs of one train step and one eval step (2 per multiply-add), from
  `step_matmuls`. Elementwise work (gates, softmaxes) is not counted.

  "train_lstm" and "train_output" split "train" into the LSTM stack and the
  rest (projection, logits, loss); "eval_lstm" and "eval_output" split
  "eval" likewise. The eval step runs the forward products other than the
  target scores, at its own batch size.
  """
  train = {block: sum(mm.flops for mm in step_matmuls(config, vocab_size, batch_size, target_rows)
                      if mm.block == block)
           for block in ("lstm", "output")}
  evaluation = {block: sum(mm.flops for mm in step_matmuls(config, vocab_size, eval_batch_size)
                           if mm.block == block and "gradient" not in mm.name
                           and mm.name != "target scores")
                for block in ("lstm", "output")}
  return {"train": train["lstm"] + train["output"], "train_lstm": train["lstm"],
          "train_output": train["output"], "eval": evaluation["lstm"] + evaluation["output"],
          "eval_lstm": evaluation["lstm"], "eval_output": evaluation["output"]}


def measure_matmul_peak(size: int) -> float:
  """Best FLOP/s of a jitted fp32 [size, size] @ [size, size] on the first device."""
  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.random.normal(key_a, (size, size), jnp.float32)
  b = jax.random.normal(key_b, (size, size), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()
  times = []
  for _ in range(5):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * size**3 / min(times)


def measure_torch_matmul_peak(size: int, device: str) -> float:
  import torch

  a = torch.randn(size, size, device=device)
  b = torch.randn(size, size, device=device)
  times = []
  for _ in range(6):
    start = time.perf_counter()
    (a @ b).sum().item()
    times.append(time.perf_counter() - start)
  return 2 * size**3 / min(times[1:])


def planned_memory_bytes(compiled: Any) -> int | None:
  """Bytes XLA plans for one step on one device: arguments, outputs and temporaries."""
  try:
    analysis = compiled.memory_analysis()
    return int(
        analysis.argument_size_in_bytes + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes
    )
  except Exception as error:  # noqa: BLE001 -- memory analysis is optional per backend
    logging.warning("no XLA memory analysis: %s", error)
    return None


class Runner(Protocol):
  """What `time_runner` times: `run(n)` takes n steps and returns once they are done."""

  def run(self, num_steps: int) -> None: ...


class OurTrainer:
  """Our pmapped train step over `num_devices` local devices, driven by `train.train_epoch`."""

  def __init__(
      self, config: ml_collections.ConfigDict, corpus: data.Corpus, batch_size: int,
      num_devices: int,
  ):
    devices = jax.local_devices()[:num_devices]
    self.model = train.make_model(config, corpus.vocab_size)
    inputs, targets = data.train_windows(corpus.train, batch_size, config.num_steps)
    self.inputs, self.targets = (
        data.device_windows(x, 0, 1, num_devices) for x in (inputs, targets)
    )
    state = train.create_train_state(config, self.model, len(inputs))
    self.params = state.params
    self.state = train.replicate(state, devices)
    self.devices = devices
    # As training runs it: ỹ once per distinct target word of each device's rows.
    self.max_distinct_targets = train.distinct_targets_bound(
        targets, num_devices, config.loss.augmented)
    self.target_rows = self.max_distinct_targets * num_devices
    self.step = train.pmap_train_step(
        config.loss, devices, max_distinct_targets=self.max_distinct_targets)
    self.key = jax.random.key(1)
    self.position = 0
    # Ahead-of-time compilation, timed; the first timed call then hits the cache.
    start = time.perf_counter()
    compiled = self.step.lower(
        self.state, self._carry(), self.inputs[0], self.targets[0], self.key
    ).compile()
    self.compile_seconds = time.perf_counter() - start
    self.memory_bytes = planned_memory_bytes(compiled)

  def _carry(self):
    # The step donates the carry, and train_epoch starts each call from zeros.
    return train.replicate(self.model.initial_carry(self.inputs.shape[2]), self.devices)

  def run(self, num_steps: int) -> None:
    if self.position + num_steps > len(self.inputs):
      self.position = 0
    window = slice(self.position, self.position + num_steps)
    self.position += num_steps
    self.state, _, _, _ = train.train_epoch(
        self.step, self.state, self._carry(), self.inputs[window], self.targets[window], self.key,
        log_every_steps=num_steps,
    )


class OurEvaluator:
  def __init__(
      self, model: models.LSTMLanguageModel, params: Any, ids: np.ndarray, batch_size: int,
      num_steps: int,
  ):
    self.args = (model, jax.device_put(params, jax.local_devices()[0]))
    self.ids, self.batch_size, self.num_steps = ids, batch_size, num_steps

  def run(self, num_steps: int) -> None:
    ids = self.ids[: num_steps * self.batch_size * self.num_steps + 1]
    train.evaluate(*self.args, ids, self.batch_size, self.num_steps)  # ends with a host sync


class TorchTrainer:
  def __init__(
      self, config: ml_collections.ConfigDict, corpus: data.Corpus, batch_size: int,
      device: str, params: Any,
  ):
    import torch

    from experiments import torch_reference

    self.torch, self.device = torch, device
    self.model = torch_reference.TorchLanguageModel(
        **config.model, vocab_size=corpus.vocab_size
    ).to(device)
    torch_reference.load_flax_params(self.model, params)
    self.model.to(device)
    self.inputs, self.targets = data.train_windows(corpus.train, batch_size, config.num_steps)
    self.step = torch_reference.make_train_step(self.model, config)
    self.state = self.model.initial_state(batch_size)
    self.position = 0

  def run(self, num_steps: int) -> None:
    if self.position + num_steps > len(self.inputs):
      self.position = 0
    metrics = []
    for i in range(self.position, self.position + num_steps):
      inputs = self.torch.from_numpy(self.inputs[i]).long().to(self.device, non_blocking=True)
      targets = self.torch.from_numpy(self.targets[i]).long().to(self.device, non_blocking=True)
      self.state, step_metrics = self.step(inputs, targets, self.state)
      metrics.append(step_metrics["cross_entropy_sum"])
    self.position += num_steps
    float(sum(metrics))  # one host sync, like ours at a log line


class TorchEvaluator:
  def __init__(self, trainer: TorchTrainer, ids: np.ndarray, batch_size: int, num_steps: int):
    from experiments import torch_reference

    self.trainer, self.eval_step = trainer, torch_reference.eval_step
    inputs, targets, _ = data.eval_windows(ids, batch_size, num_steps)
    self.inputs, self.targets, self.batch_size = inputs, targets, batch_size

  def run(self, num_steps: int) -> None:
    torch, device = self.trainer.torch, self.trainer.device
    state = self.trainer.model.initial_state(self.batch_size)
    total = 0.0
    for i in range(num_steps):
      state, nll = self.eval_step(
          self.trainer.model, torch.from_numpy(self.inputs[i]).long().to(device),
          torch.from_numpy(self.targets[i]).long().to(device), state,
      )
      total = total + nll
    float(total)


# Near init every model predicts about uniformly, so its loss is about log(vocab) whatever
# its weights. On medium,real's init (relative differences, measured on a CPU): a reference
# with a 10% larger embedding moves the loss by 1e-5, and one without the augmented term by
# 2e-6. So the check compares the logits elementwise (that embedding: 0.11) and triples the
# parameters, where the KL weighs enough to be seen (no augmented term: 7e-4 of the loss;
# configs/default.py's: 3e-4). Ours and the reference agree to 2e-6 on both, at 1x and 3x.
CHECKED_PARAMS_SCALE = 3.0
TORCH_TOLERANCE = 1e-4


def check_torch_matches(
    config: ml_collections.ConfigDict, corpus: data.Corpus, params: Any, device: str
) -> dict[str, float]:
  """How far torch's deterministic logits and loss are from ours on the same params.

  Both compute on `params` times CHECKED_PARAMS_SCALE, in float32 with full-precision
  matmuls and ours with the scan LSTM, whatever is timed: the check compares functions,
  not roundings or kernels (tests/test_models.py compares cuDNN's with the scan's).

  Returns: {"logits": max |ours - theirs| / max |ours| over the [4, T, V] logits,
    "loss": |ours - theirs| / |ours| of the summed loss}.
  Raises UserError where either exceeds TORCH_TOLERANCE: the timings would not compare
  the same work.
  """
  import torch

  from experiments import torch_reference

  config = config.copy_and_resolve_references()
  config.model.compute_dtype = "float32"
  config.model.lstm_implementation = "scan"
  params = jax.tree.map(lambda x: CHECKED_PARAMS_SCALE * x, params)
  model = train.make_model(config, corpus.vocab_size)
  inputs, targets = (x[0] for x in data.train_windows(corpus.train, 4, config.num_steps))
  with jax.default_matmul_precision("highest"):
    outputs = model.apply(
        {"params": params}, inputs, model.initial_carry(4), deterministic=True,
        method=models.LSTMLanguageModel.outputs,
    )
    cross_entropy, kl = train.loss_terms(outputs, targets, config.loss)
    our_loss = float(jnp.sum(cross_entropy + config.loss.gamma * config.loss.tau * kl))
  reference = torch_reference.TorchLanguageModel(**config.model, vocab_size=corpus.vocab_size)
  torch_reference.load_flax_params(reference, params)
  reference.to(device).eval()
  tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
  torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
  try:
    with torch.no_grad():
      logits, bias_free_logits, _ = reference(
          torch.from_numpy(inputs).long().to(device), reference.initial_state(4)
      )
      torch_terms = torch_reference.loss_terms(
          logits, bias_free_logits, torch.from_numpy(targets).long().to(device),
          reference.embed.weight, config.loss,
      )
      their_loss = float(
          (torch_terms[0] + config.loss.gamma * config.loss.tau * torch_terms[1]).sum())
  finally:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
  our_logits = np.asarray(outputs.logits)
  differences = {
      "logits": float(np.max(np.abs(our_logits - logits.cpu().numpy()))
                      / np.max(np.abs(our_logits))),
      "loss": abs(our_loss - their_loss) / abs(our_loss),
  }
  for name, difference in differences.items():
    if not difference <= TORCH_TOLERANCE:  # NaN too
      what = {"logits": "logits", "loss": "a loss"}[name]
      raise UserError(
          f"experiments/torch_reference.py computes {what} other than ours on the same "
          f"parameters (relative difference {difference:.2g}, above {TORCH_TOLERANCE:g}); "
          "its timings would not compare the same work")
  return differences


def device_peak_bytes() -> int | None:
  """The allocator's peak on the first device so far in this process (GPU/TPU; None on CPU).

  JAX cannot reset it, so a row's value also covers the rows before it.
  """
  stats = jax.local_devices()[0].memory_stats()
  return stats.get("peak_bytes_in_use") if stats else None


def time_runner(runner: Runner, num_steps: int) -> tuple[float, int]:
  """Seconds for `num_steps` steps, and the minor page faults of the process meanwhile."""
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  start = time.perf_counter()
  runner.run(num_steps)
  seconds = time.perf_counter() - start
  return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def benchmark_pair(
    ours: Runner, theirs: Runner | None, tokens_per_step: int
) -> tuple[dict, dict | None]:
  """Compiles/warms both, then alternates timed repeats. Returns per-implementation stats."""
  stats = []
  for runner in (ours, theirs):
    if runner is None:
      stats.append(None)
      continue
    # Every call, the first included, runs as many steps as a timed one: our evaluate
    # compiles one program per windows-per-call, so a shorter call would compile another.
    first, _ = time_runner(runner, FLAGS.steps_per_repeat)  # compiles (ours) or warms (torch)
    for _ in range(FLAGS.warmup):
      time_runner(runner, FLAGS.steps_per_repeat)
    stats.append({"first_call_seconds": first, "repeat_seconds": [], "minor_faults": 0})
  for _ in range(FLAGS.repeats):
    for runner, stat in zip((ours, theirs), stats, strict=True):
      if runner is not None:
        seconds, faults = time_runner(runner, FLAGS.steps_per_repeat)
        stat["repeat_seconds"].append(seconds)
        stat["minor_faults"] += faults
  for stat in stats:
    if stat is None:
      continue
    # Pages the OS had to map in anew: how much of each step's memory the allocator
    # did not reuse (see tied_lm.hostmem).
    stat["minor_faults_per_step"] = stat.pop("minor_faults") / (
        FLAGS.repeats * FLAGS.steps_per_repeat)
    repeat_seconds = statistics.median(stat["repeat_seconds"])
    step_seconds = repeat_seconds / FLAGS.steps_per_repeat
    stat["step_ms"] = 1e3 * step_seconds
    stat["tokens_per_second"] = tokens_per_step / step_seconds
    # The first call compiles (ours) or warms up (torch); AOT-compiled steps overwrite this.
    stat["compile_seconds"] = max(stat["first_call_seconds"] - repeat_seconds, 0.0)
  return stats[0], stats[1]


def library_versions() -> dict:
  """Our libraries' versions, with torch's under --compare=torch; applies --fp32_matmuls."""
  versions = provenance.versions()
  if FLAGS.fp32_matmuls == "strict":
    jax.config.update("jax_default_matmul_precision", "highest")
  if FLAGS.compare == "torch":
    import torch

    versions["torch"] = torch.__version__
    if FLAGS.fp32_matmuls == "strict":
      torch.backends.cuda.matmul.allow_tf32 = False
      torch.backends.cudnn.allow_tf32 = False
  return versions


def paired_ratio_range(ours: dict, theirs: dict) -> list[float]:
  """[min, max] over the repeats of theirs/ours seconds, from `benchmark_pair` stats.

  Each repeat of ours ran beside one of theirs: the spread of the paired ratios
  is the machine's noise.
  """
  paired = [theirs_seconds / ours_seconds for ours_seconds, theirs_seconds in zip(
      ours["repeat_seconds"], theirs["repeat_seconds"], strict=True)]
  return [min(paired), max(paired)]


def peak_fraction(achieved_flops: float, peak_flops: float, num_devices: int,
                  platform: str) -> float:
  """The share of the peak that a step on `num_devices` devices reached.

  `peak_flops` is one device's. A GPU's or TPU's devices each add their own; a CPU's
  host devices share its cores, which one device's product already keeps busy.
  """
  return achieved_flops / (peak_flops * (1 if platform == "cpu" else num_devices))


def ratios_vs_torch(row: dict) -> dict[str, Any]:
  """Ours over torch's tokens/s ({kind}_ratio_vs_torch, above 1: we are faster) and its
  paired range, for each of train and eval that `row` timed beside torch."""
  ratios = {}
  for kind in ("train", "eval"):
    if row.get(f"torch_{kind}"):
      ours, theirs = row[kind], row[f"torch_{kind}"]
      ratios[f"{kind}_ratio_vs_torch"] = ours["tokens_per_second"] / theirs["tokens_per_second"]
      ratios[f"{kind}_ratio_vs_torch_range"] = paired_ratio_range(ours, theirs)
  return ratios


def validate_timed(config: ml_collections.ConfigDict, batch_size: int, num_devices: int) -> None:
  """Refuses a config, batch size or device count that cannot be timed, before any timing."""
  if num_devices > jax.local_device_count():
    raise UserError(f"--num_devices={num_devices}: only {jax.local_device_count()} local "
                    "devices (on a CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N)")
  timed = config.copy_and_resolve_references()
  timed.batch_size = batch_size
  train.validate_config(timed, num_devices)


def timed_configs(
    device_counts: list[int],
) -> list[tuple[str, ml_collections.ConfigDict, list[int]]]:
  """(spec, config, batch sizes) of each --configs entry, shared with profile_step.

  Every row (config x batch size x device count) is checked before any is timed.
  """
  plan = []
  calls = FLAGS.steps_per_repeat  # windows each call runs, warm-up included
  for spec in FLAGS.configs:
    config = load_config(spec, FLAGS.set)
    batch_sizes = [int(b) for b in FLAGS.batch_sizes] or [config.batch_size]
    for batch_size in batch_sizes:
      for num_devices in device_counts:
        validate_timed(config, batch_size, num_devices)
    # The corpus too: a missing one or too small a split fails here, not after hours.
    corpus = data.load_corpus(config.dataset, config.data_dir, config.max_vocab_size)
    for batch_size in batch_sizes:
      windows = len(data.train_windows(corpus.train, batch_size, config.num_steps)[0])
      if windows < calls:  # a timed call would run fewer steps than it is counted for
        raise UserError(
            f"config {spec!r}, batch {batch_size}: the train split has {windows} windows, "
            f"fewer than the {calls} each timed call runs (--steps_per_repeat)")
    eval_tokens = calls * FLAGS.eval_batch_size * config.num_steps + 1
    if len(corpus.valid) < eval_tokens:
      raise UserError(
          f"config {spec!r}: --eval_batch_size={FLAGS.eval_batch_size} needs {eval_tokens:,} "
          f"validation tokens for {calls} windows per timed call; the split has "
          f"{len(corpus.valid):,}")
    plan.append((spec, config, batch_sizes))
  return plan


def output_path(default_name: str) -> Path:
  """--output, or experiments/results/`default_name`; refused before any timing if unwritable."""
  if FLAGS.output.strip():
    output = provenance.output_file(FLAGS.output, "a JSON file")
    provenance.check_not_a_run_file(FLAGS.output, output, "file")
    return output
  return REPO / "experiments/results" / default_name


@errors.command
def main(argv: list[str]) -> None:
  errors.no_positional_arguments(argv)
  # Compile times are measured, never loaded from a persistent cache the user has set.
  jax.config.update("jax_enable_compilation_cache", False)
  run_benchmark()


def run_benchmark() -> None:
  start = time.time()
  host_malloc = hostmem.reuse_freed_memory()  # before the first computation
  device_counts = [int(n) for n in FLAGS.num_devices]
  plan = timed_configs(device_counts)
  commit = provenance.git_commit()  # what runs, whatever HEAD is at the end
  platform_name = jax.local_devices()[0].platform
  output = output_path(f"benchmark_{platform_name}.json")
  torch_device = "cuda" if platform_name == "gpu" else "cpu"
  versions = library_versions()
  peak_samples = {"jax": []} | ({"torch": []} if FLAGS.compare == "torch" else {})

  def sample_peak() -> None:
    peak_samples["jax"].append(measure_matmul_peak(FLAGS.matmul_size))
    if "torch" in peak_samples:
      peak_samples["torch"].append(measure_torch_matmul_peak(FLAGS.matmul_size, torch_device))
    logging.info("fp32 matmul peak: %s",
                 {k: f"{v[-1] / 1e9:.0f} GFLOP/s" for k, v in peak_samples.items()})

  sample_peak()

  header = provenance.header("experiments.benchmark", commit, versions)

  def results(rows: list[dict], complete: bool) -> dict[str, Any]:
    peak = {k: max(v) for k, v in peak_samples.items()}
    for row in rows:
      for kind in ("train", "eval"):
        if kind in row:
          row[kind]["peak_fraction"] = peak_fraction(
              row[kind]["achieved_flops"], peak["jax"],
              row["num_devices"] if kind == "train" else 1, platform_name)
    return {
        **header, "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "host_malloc": host_malloc,
        "fp32_matmuls": FLAGS.fp32_matmuls, "matmul_peak_flops": peak,
        "matmul_peak_samples": peak_samples, "rows": rows,
        "complete": complete, "wall_seconds": time.time() - start,
    }

  rows = []
  for spec, config, batch_sizes in plan:
    corpus = data.load_corpus(config.dataset, config.data_dir, config.max_vocab_size)
    for batch_size in batch_sizes:
      for num_devices in device_counts:
        if rows:
          sample_peak()
        ours = OurTrainer(config, corpus, batch_size, num_devices)
        flops = step_flops(config, corpus.vocab_size, batch_size, FLAGS.eval_batch_size,
                           ours.target_rows)
        theirs = None
        row = {"config": spec, "overrides": FLAGS.set, "batch_size": batch_size,
               "num_devices": num_devices, "num_steps": config.num_steps,
               "vocab_size": corpus.vocab_size, "target_rows": ours.target_rows,
               "train_flops_per_step": flops["train"],
               "eval_flops_per_step": flops["eval"], "memory_bytes": ours.memory_bytes}
        if FLAGS.compare == "torch" and num_devices == 1:
          import torch

          torch.manual_seed(0)
          differences = check_torch_matches(config, corpus, ours.params, torch_device)
          row["torch_loss_relative_difference"] = differences["loss"]
          row["torch_logits_relative_difference"] = differences["logits"]
          if torch_device == "cuda":  # each row's torch peak is its own
            torch.cuda.reset_peak_memory_stats()
          theirs = TorchTrainer(config, corpus, batch_size, torch_device, ours.params)
        tokens = batch_size * config.num_steps
        row["train"], row["torch_train"] = benchmark_pair(ours, theirs, tokens)
        row["train"]["compile_seconds"] = ours.compile_seconds
        row["device_peak_bytes"] = device_peak_bytes()
        if theirs is not None and torch_device == "cuda":
          row["torch_peak_bytes"] = torch.cuda.max_memory_allocated()
        row["train"]["achieved_flops"] = flops["train"] / (row["train"]["step_ms"] / 1e3)
        if num_devices == 1:
          eval_batch = FLAGS.eval_batch_size
          evaluators = (
              OurEvaluator(ours.model, ours.params, corpus.valid, eval_batch, config.num_steps),
              TorchEvaluator(theirs, corpus.valid, eval_batch, config.num_steps)
              if theirs else None,
          )
          row["eval"], row["torch_eval"] = benchmark_pair(
              *evaluators, eval_batch * config.num_steps
          )
          row["eval"]["achieved_flops"] = flops["eval"] / (row["eval"]["step_ms"] / 1e3)
        row.update(ratios_vs_torch(row))
        rows.append(row)
        print_row(row)
        # Written after every row, so that a run cut short keeps what it measured.
        provenance.write_json(output, results(rows, complete=False))

  sample_peak()
  final = results(rows, complete=True)
  provenance.write_json(output, final)
  print_table(final)
  print(f"wrote {output}")


def _fmt(row: dict, kind: str) -> str:
  stat = row.get(kind)
  return f"{stat['tokens_per_second']:>9.0f}" if stat else f"{'-':>9}"


def print_row(row: dict) -> None:
  logging.info("%s batch %d x%d devices: %s", row["config"], row["batch_size"],
               row["num_devices"], {k: row[k] for k in row if "ratio_vs_torch" in k})


def print_table(results: dict) -> None:
  peak = results["matmul_peak_flops"]
  print("fp32 matmul peak: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peak.items()))
  print(f"{'config':<30} {'batch':>5} {'dev':>3} | {'train tok/s':>11} {'torch':>9} "
        f"{'ratio':>5} {'%peak':>5} {'compile s':>9} | {'eval tok/s':>10} {'torch':>9} "
        f"{'ratio':>5}")
  for row in results["rows"]:
    train_ratio = row.get("train_ratio_vs_torch")
    eval_ratio = row.get("eval_ratio_vs_torch")
    print(
        f"{row['config']:<30} {row['batch_size']:>5} {row['num_devices']:>3} | "
        f"{_fmt(row, 'train'):>11} {_fmt(row, 'torch_train')} "
        f"{(f'{train_ratio:.2f}' if train_ratio else '-'):>5} "
        f"{100 * row['train']['peak_fraction']:>5.1f} {row['train']['compile_seconds']:>9.1f} | "
        f"{(_fmt(row, 'eval') if 'eval' in row else '-'):>10} {_fmt(row, 'torch_eval')} "
        f"{(f'{eval_ratio:.2f}' if eval_ratio else '-'):>5}"
    )


if __name__ == "__main__":
  app.run(main, flags_parser=errors.parse_flags)
