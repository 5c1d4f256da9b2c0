"""Training state, the pmapped train step, evaluation and the epoch loop.

`train_and_evaluate(config, workdir)` is the entry point. Running it again on
the same workdir resumes from the last checkpoint.
"""

import contextlib
import functools
import hashlib
import logging as std_logging
import math
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax.training import train_state
from jax import lax
from jax.experimental import multihost_utils

from tied_lm import data, fileio, hostmem, losses, models, provenance, reporting
from tied_lm.checkpoints import Checkpoints
from tied_lm.errors import UserError
from tied_lm.fileio import atomic_write

AXIS = "batch"


class ConfigError(UserError):
  """A config value that cannot work."""


def validate_config(config: ml_collections.ConfigDict, num_devices: int | None) -> None:
  """Raises ConfigError on the first value that cannot work, before any work.

  Args:
    num_devices: the global device count the batch is split over; None leaves the
      checks that need the devices to the run (for a process that must not start a
      backend, which would take a GPU's memory from the runs it launches).
  """
  try:
    checks = _config_checks(config, num_devices)
  except (AttributeError, KeyError) as error:
    # ml_collections' error for a field the config lacks (a config file of one's own, not
    # built on configs/default.py): a KeyError("'name'"), perhaps with a "Did you mean"
    # line, or an AttributeError raised while handling one.
    key_error = error if isinstance(error, KeyError) else error.__context__
    missing = isinstance(key_error, KeyError) and re.match(r"'(\w+)'", str(key_error.args[0]))
    if not missing:
      raise
    raise ConfigError(f"the config has no field {missing[1]!r}: build it on "
                      "configs/default.py's get_config(), which defines every field") from None
  for ok, message in checks:
    if not ok:
      raise ConfigError(message)


def _is_integer(value: Any) -> bool:
  return type(value) is int  # not bool, nor NumPy's, which config.json cannot hold


def _is_real(value: Any) -> bool:
  # An int beyond float64 (10**400) would overflow in the checks' arithmetic.
  return type(value) is float or (type(value) is int and abs(value) <= models.FLOAT32_MAX)


# Every field's kind: (test, what the message asks for). A config file of one's own can
# hold a string "20" or a hidden_size of 64.5, which the checks below would fail on with
# a TypeError, or pass. A string such as "False" would be true.
CONFIG_FIELD_KINDS = {
    **dict.fromkeys((
        "max_vocab_size", "batch_size", "num_steps", "eval_batch_size", "num_epochs",
        "max_steps_per_epoch", "seed", "log_every_steps", "checkpoint_every_steps",
        "model.embed_dim", "model.hidden_size", "model.num_layers", "model.unroll",
        "optim.decay_start_epoch"), (_is_integer, "a whole number")),
    **dict.fromkeys((
        "model.init_scale", "model.input_dropout", "model.hidden_dropout",
        "model.output_dropout", "loss.tau", "loss.gamma", "optim.learning_rate",
        "optim.decay_rate", "optim.clip_norm"), (_is_real, "a number")),
    **dict.fromkeys((
        "dataset", "on_nonfinite", "model.compute_dtype", "model.lstm_implementation",
        "loss.augmented_form"), (lambda value: isinstance(value, str), "a name")),
    "data_dir": (lambda value: isinstance(value, str), "a folder's name or ''"),
    **dict.fromkeys((
        "model.tie_embeddings", "model.output_bias", "model.output_projection",
        "loss.augmented", "loss.stop_gradient_target", "loss.kl_output_bias"),
        (lambda value: isinstance(value, bool), "True or False")),
}


def _config_checks(config: ml_collections.ConfigDict,
                   num_devices: int | None) -> list[tuple[bool, str]]:
  """validate_config's checks, as (passed, message) pairs; reads every field a run uses."""
  for field, (is_kind, kind) in CONFIG_FIELD_KINDS.items():
    value = config
    for name in field.split("."):
      value = value[name]
    if not is_kind(value):  # the checks below compare values of the right kind only
      foreign = type(value).__module__ != "builtins"
      return [(False, f"{field}={value!r} must be {kind}"
               + (f" of Python's own, not a {type(value).__module__}.{type(value).__name__}"
                  if foreign else ""))]
  low_tau, high_tau = losses.TEMPERATURE_RANGE
  vocab_problem = data.max_vocab_size_problem(config.dataset, config.max_vocab_size)
  backend = None if num_devices is None else jax.default_backend()  # None: not started
  checks = [
      (config.dataset in data.DATASETS,
       f"dataset={config.dataset!r} is unknown; choose one of {', '.join(data.DATASETS)}"),
      (config.batch_size > 0, f"batch_size={config.batch_size} must be positive"),
      (config.num_steps > 0, f"num_steps={config.num_steps} must be positive"),
      (config.eval_batch_size > 0,
       f"eval_batch_size={config.eval_batch_size} must be positive"),
      (config.num_epochs > 0, f"num_epochs={config.num_epochs} must be positive"),
      (config.max_steps_per_epoch >= 0,
       f"max_steps_per_epoch={config.max_steps_per_epoch} must be >= 0 (0 = full epochs)"),
      (config.log_every_steps > 0, f"log_every_steps={config.log_every_steps} must be positive"),
      (config.checkpoint_every_steps >= 0,
       f"checkpoint_every_steps={config.checkpoint_every_steps} must be >= 0 "
       "(0 = at epoch ends only)"),
      (config.on_nonfinite in ("stop", "skip"),
       f"on_nonfinite={config.on_nonfinite!r} must be 'stop' or 'skip'"),
      (num_devices is None or config.batch_size % num_devices == 0,
       f"batch_size={config.batch_size} is not divisible by the {num_devices} devices"),
      (vocab_problem is None, vocab_problem),
      (config.model.lstm_implementation != "cudnn" or backend in (None, "gpu"),
       "model.lstm_implementation='cudnn' needs an NVIDIA GPU (jax.experimental.rnn); this "
       f"run's devices are {backend}"),
      (losses.is_temperature(config.loss.tau),
       f"loss.tau={config.loss.tau} must be in [{low_tau:.3g}, {high_tau:.3g}] (float32's "
       "positive normal numbers)"),
      (not config.loss.augmented or config.loss.tau >= losses.MIN_TRAINING_TAU,
       f"loss.tau={config.loss.tau} must be >= {losses.MIN_TRAINING_TAU} to train: the "
       "fused loss's float32 KL and gradients lose accuracy as tau falls below it"),
      (config.loss.gamma >= 0, f"loss.gamma={config.loss.gamma} must be >= 0"),
      (config.loss.augmented_form in losses.AUGMENTED_FORMS,
       f"loss.augmented_form={config.loss.augmented_form!r} must be one of "
       f"{', '.join(losses.AUGMENTED_FORMS)}"),
      (not config.loss.kl_output_bias or config.model.output_bias,
       "loss.kl_output_bias=True needs an output bias: set model.output_bias=True"),
      (config.optim.learning_rate > 0,
       f"optim.learning_rate={config.optim.learning_rate} must be > 0"),
      (0 < config.optim.decay_rate <= 1,
       f"optim.decay_rate={config.optim.decay_rate} must be in (0, 1]"),
      # The schedule counts epochs in int32.
      (0 <= config.optim.decay_start_epoch < 2**31,
       f"optim.decay_start_epoch={config.optim.decay_start_epoch} must be in [0, 2**31) "
       "(the epochs before the learning rate decays)"),
      (config.optim.clip_norm > 0, f"optim.clip_norm={config.optim.clip_norm} must be > 0"),
  ]
  # inf passes the comparisons above; an infinite learning rate, say, makes the first
  # update infinite while its loss is still finite.
  for field in ("loss.gamma", "optim.learning_rate", "optim.clip_norm"):
    section, name = field.split(".")
    value = config[section][name]
    checks.append((models.fits_float32(value),
                   f"{field}={value} must be finite in float32 (<= {models.FLOAT32_MAX:.3g})"))
  # The step weighs the KL by γτ: finite factors can still make it inf (and inf * 0 = NaN).
  alpha = config.loss.gamma * config.loss.tau
  checks.append((not config.loss.augmented or models.fits_float32(alpha),
                 f"loss.gamma * loss.tau={alpha:.3g} (the KL's weight) must be finite in "
                 f"float32 (<= {models.FLOAT32_MAX:.3g})"))
  # seed + 1 keys the dropout. jax.random.key keeps a seed's low 32 bits (without x64), so
  # seed 2**32 would train seed 0's run again.
  checks.append((0 <= config.seed < 2**32 - 1, f"seed={config.seed} must be in [0, 2**32 - 1)"))
  checks += [(False, problem) for problem in models.field_problems(config.model, "model.")]
  return checks


def make_model(config: ml_collections.ConfigDict, vocab_size: int) -> models.LSTMLanguageModel:
  return models.LSTMLanguageModel(vocab_size=vocab_size, **config.model)


def learning_rate_schedule(
    optim: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.Schedule:
  """Constant for `decay_start_epoch` epochs, then x`decay_rate` every epoch."""

  def schedule(step):
    epoch = step // steps_per_epoch + 1  # 1-based epoch of this step
    num_decays = jnp.maximum(epoch - optim.decay_start_epoch, 0)
    return optim.learning_rate * optim.decay_rate**num_decays

  return schedule


def make_optimizer(
    optim: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.GradientTransformation:
  """SGD on gradients rescaled to global norm <= clip_norm."""
  return optax.chain(
      optax.clip_by_global_norm(optim.clip_norm),
      optax.sgd(learning_rate_schedule(optim, steps_per_epoch)),
  )


def create_train_state(
    config: ml_collections.ConfigDict,
    model: models.LSTMLanguageModel,
    steps_per_epoch: int,
) -> train_state.TrainState:
  init_tokens = jnp.zeros((1, config.num_steps), jnp.int32)
  variables = model.init(
      jax.random.key(config.seed), init_tokens, model.initial_carry(1), deterministic=True
  )
  return train_state.TrainState.create(
      apply_fn=model.apply,
      params=variables["params"],
      tx=make_optimizer(config.optim, steps_per_epoch),
  )


def loss_terms(
    outputs: models.LMOutputs,
    targets: jax.Array,
    loss_config: ml_collections.ConfigDict,
    max_distinct_targets: int = 0,
) -> tuple[jax.Array, jax.Array]:
  """Per-token cross-entropy and augmented KL, each [B, T] float32.

  The KL is zero when `loss_config.augmented` is off. `max_distinct_targets`: see
  `losses.cross_entropy_and_kl` (speed only).
  """
  return losses.cross_entropy_and_kl(
      outputs.bias_free_logits,
      targets,
      outputs.embedding,
      loss_config.tau,
      output_bias=outputs.output_bias,
      augmented=loss_config.augmented,
      stop_gradient_target=loss_config.stop_gradient_target,
      max_distinct_targets=max_distinct_targets,
      form=loss_config.augmented_form,
      kl_output_bias=loss_config.kl_output_bias,
  )


def distinct_targets_bound(targets: np.ndarray, num_devices: int, augmented: bool = True) -> int:
  """`train_step`'s max_distinct_targets for these global windows: the most distinct
  ids of one device's rows, or 0 where that saves nothing (no augmented loss, or no
  repeated word).

  Every process computes it from the same global windows, so all compile one step.
  """
  if not augmented:
    return 0
  bound = data.max_distinct_targets(targets, num_devices)
  return 0 if bound == targets[0].size // num_devices else bound


def train_step(
    state: train_state.TrainState,
    carry: models.Carry,
    inputs: jax.Array,
    targets: jax.Array,
    dropout_key: jax.Array,
    *,
    loss_config: ml_collections.ConfigDict,
    skip_nonfinite: bool = False,
    max_distinct_targets: int = 0,
) -> tuple[train_state.TrainState, models.Carry, dict[str, jax.Array]]:
  """One SGD step on this device's rows; run under `jax.pmap(axis_name=AXIS)`.

  The objective is sum_t [CE + gamma * tau * KL], averaged over the rows.
  Gradients are averaged over devices before clipping, so N devices give the
  same update as one device on the whole batch.

  Args:
    carry: per-layer (c, h), each [b, H] for this device's b rows.
    inputs, targets: [b, T] word ids.
    dropout_key: the same on every device; folded with the step and device.

    skip_nonfinite: if True, a step whose loss or gradient is not finite
      leaves params, optimizer state and carry as they were (the step count
      and the optimizer's schedule count still advance) and reports zero
      cross-entropy, KL and tokens.
    max_distinct_targets: if > 0, at least the number of distinct ids in any
      device's `targets`: ỹ is then computed once per distinct word (same
      numbers up to float summation order, fewer FLOPs; see
      `losses.cross_entropy_and_kl`).

  Returns:
    the new state, the new carry and replicated metrics: sums of the
    cross-entropy and the KL over all devices' tokens, the token count, the
    gradient's global norm before clipping and nonfinite_steps (1.0 if this
    step's loss or gradient was not finite).
  """
  key = jax.random.fold_in(jax.random.fold_in(dropout_key, state.step), lax.axis_index(AXIS))
  alpha = loss_config.gamma * loss_config.tau

  def objective(params):
    outputs = state.apply_fn(
        {"params": params},
        inputs,
        carry,
        deterministic=False,
        rngs={"dropout": key},
        method=models.LSTMLanguageModel.outputs,
    )
    cross_entropy, kl = loss_terms(outputs, targets, loss_config, max_distinct_targets)
    loss = jnp.sum(cross_entropy + alpha * kl) / inputs.shape[0]
    return loss, (outputs.carry, cross_entropy.sum(), kl.sum())

  grads, (new_carry, cross_entropy_sum, kl_sum) = jax.grad(objective, has_aux=True)(
      state.params
  )
  if lax.axis_size(AXIS) > 1:  # on one device the all-reduce would only copy every gradient
    grads = lax.pmean(grads, AXIS)
  metrics = {
      "cross_entropy_sum": lax.psum(cross_entropy_sum, AXIS),
      "kl_sum": lax.psum(kl_sum, AXIS),
      "num_tokens": lax.psum(jnp.float32(targets.size), AXIS),
      "grad_norm": optax.global_norm(grads),
  }
  # Every term is already reduced over devices, so all devices agree on it.
  finite = (
      jnp.isfinite(metrics["cross_entropy_sum"]) & jnp.isfinite(metrics["kl_sum"])
      & jnp.isfinite(metrics["grad_norm"])
  )
  metrics["nonfinite_steps"] = 1.0 - finite.astype(jnp.float32)
  new_state = state.apply_gradients(grads=grads)
  if skip_nonfinite:

    def keep_if_finite(path, new, old):
      # The schedule's step counter advances with state.step, or the learning rate
      # would decay one step late per skipped step.
      if isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "count":
        return new
      return jnp.where(finite, new, old)

    new_state = new_state.replace(
        params=jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                            new_state.params, state.params),
        opt_state=jax.tree_util.tree_map_with_path(
            keep_if_finite, new_state.opt_state, state.opt_state),
    )
    new_carry = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_carry, carry)
    # A skipped step trained on no tokens: its non-finite sums stay out of the logs.
    for name in ("cross_entropy_sum", "kl_sum", "num_tokens"):
      metrics[name] = jnp.where(finite, metrics[name], 0.0)
  return new_state, new_carry, metrics


def pmap_train_step(
    loss_config: ml_collections.ConfigDict,
    devices: list[jax.Device] | None = None,
    *,
    skip_nonfinite: bool = False,
    max_distinct_targets: int = 0,
) -> Any:
  """`train_step` pmapped over `devices` (default: all local ones).

  State and carry are donated; the dropout key is broadcast; metrics come
  back replicated (out_axes=None), so reading them needs no per-device index.
  """
  return jax.pmap(
      functools.partial(train_step, loss_config=loss_config, skip_nonfinite=skip_nonfinite,
                        max_distinct_targets=max_distinct_targets),
      axis_name=AXIS,
      in_axes=(0, 0, 0, 0, None),
      donate_argnums=(0, 1),
      out_axes=(0, 0, None),
      devices=devices,
  )


# The most windows one evaluation call scans: the host dispatches once per call, not per
# window (a small model's window can take less time than a dispatch), and at most this
# many minus one padding windows are computed in vain.
MAX_EVAL_WINDOWS_PER_CALL = 32


@functools.partial(jax.jit, static_argnames="model", donate_argnums=1)
def eval_step(
    params: Any,
    carry: models.Carry,
    nll_sum: jax.Array,
    inputs: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    model: models.LSTMLanguageModel,
) -> tuple[models.Carry, jax.Array]:
  """Consecutive windows, the state carried from each to the next.

  Args:
    nll_sum: [] the weighted NLL sum so far; each window's is added to it in turn.
    inputs, targets, weights: [W, B, T], W windows.

  Returns:
    (the carry after the last window, nll_sum with every window's added).
  """

  def one_window(carry_and_sum, window):
    carry, nll_sum = carry_and_sum
    inputs, targets, weights = window
    outputs = model.apply(
        {"params": params}, inputs, carry, deterministic=True,
        method=models.LSTMLanguageModel.outputs,
    )
    return (outputs.carry, nll_sum + window_nll(outputs, targets, weights)), None

  (carry, nll_sum), _ = lax.scan(one_window, (carry, nll_sum), (inputs, targets, weights))
  return carry, nll_sum


def window_nll(outputs: models.LMOutputs, targets: jax.Array, weights: jax.Array) -> jax.Array:
  """The weighted NLL sum of one window's outputs; targets and weights [B, T]."""
  # The fused pass: neither logits + bias nor the log-softmax is written out.
  cross_entropy, _ = losses.cross_entropy_and_kl(
      outputs.bias_free_logits, targets, outputs.embedding, 1.0,
      output_bias=outputs.output_bias, augmented=False,
  )
  return jnp.sum(cross_entropy * weights)


def _memory_shortfall(per_device: int, num_devices: int) -> tuple[str, str, str] | None:
  """(GB needed, whose memory, GB it has) if `per_device` bytes on each device cannot fit,
  else None (also where the system does not say).

  Where the device reports its allocator's limit (a GPU) each device must hold its
  bytes; on a CPU the `num_devices` of this process share the host's memory
  (`hostmem.total_bytes`).
  """
  limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
  if limit is not None:
    needed, where = per_device, "a device's"
  else:
    needed, where = per_device * num_devices, "this host's"
    limit = hostmem.total_bytes()
  if limit is None or needed <= limit:
    return None
  # Rounded apart (needed up, the limit down), so that the two never read the same.
  return (f"{math.ceil(needed / 1e8) / 10:,.1f}", where, f"{math.floor(limit / 1e8) / 10:,.1f}")


def logits_memory_problem(
    name: str, value: int, rows: int, num_steps: int, vocab_size: int, num_devices: int = 1
) -> str | None:
  """Why a batch cannot fit in memory because its float32 logits alone do not, or None.

  A lower bound: a batch refused here cannot run; one accepted may still run out.

  Args:
    name, value: the config field that set the batch, for the message.
    rows: the batch rows on each device.
    num_devices: this process's devices (see `_memory_shortfall`).
  """
  shortfall = _memory_shortfall(rows * num_steps * vocab_size * 4, num_devices)
  if shortfall is None:
    return None
  needed, where, limit = shortfall
  shape = f"[{rows:,}, {num_steps}, {vocab_size:,}]" + (
      f" on each of {num_devices} devices" if num_devices > 1 else "")
  return (f"{name}={value} needs {needed} GB for its float32 logits alone ({shape}), more "
          f"than {where} {limit} GB of memory; lower {name}")


def parameters_memory_problem(model: models.LSTMLanguageModel, num_devices: int = 1) -> str | None:
  """Why a model cannot train because its float32 parameters and their gradients alone do
  not fit in memory, or None. A lower bound, as `logits_memory_problem`; counted without
  allocating anything."""

  def count_with(num_layers: int) -> int:
    layers = model.clone(num_layers=num_layers)
    return count_params(jax.eval_shape(lambda: layers.init(
        jax.random.key(0), jnp.zeros((1, 1), jnp.int32), layers.initial_carry(1),
        deterministic=True)))

  # Layers after the first are alike (hidden_size in and out), so the count is linear in
  # their number: tracing 2 and 3 layers gives it, where tracing them all took minutes
  # for a mistyped num_layers=100000.
  if model.num_layers <= 3:
    count = count_with(model.num_layers)
  else:
    two, three = count_with(2), count_with(3)
    count = two + (model.num_layers - 2) * (three - two)
  shortfall = _memory_shortfall(2 * 4 * count, num_devices)
  if shortfall is None:
    return None
  needed, where, limit = shortfall
  return (f"the model's {count:,} parameters need {needed} GB for themselves and their "
          f"gradients alone (float32"
          + (f", on each of {num_devices} devices" if num_devices > 1 else "")
          + f"), more than {where} {limit} GB of memory; make it smaller (model.hidden_size, "
          "model.embed_dim, model.num_layers)")


def check_eval_memory(batch_size: int, num_steps: int, vocab_size: int) -> None:
  """Raises data.DataError if an evaluation batch's logits cannot fit (one device)."""
  problem = logits_memory_problem("eval_batch_size", batch_size, batch_size, num_steps, vocab_size)
  if problem:
    raise data.DataError(problem)


def evaluate(
    model: models.LSTMLanguageModel,
    params: Any,
    ids: np.ndarray,
    batch_size: int,
    num_steps: int,
    split: str = "evaluation",
    log_every_seconds: float = 30.0,
) -> tuple[float, int]:
  """Perplexity over every target token of `ids`, carrying state between windows.

  An evaluation that takes longer than `log_every_seconds` (minutes at batch 1) logs its
  progress that often.

  Returns:
    (perplexity, number of target tokens scored), the latter exactly len(ids) - 1.

  Raises:
    data.DataError: if `batch_size` exceeds len(ids) - 1 (named by `split`), or its
      logits alone exceed the memory (`check_eval_memory`).
  """
  inputs, targets, weights = data.eval_windows(ids, batch_size, num_steps, split)
  check_eval_memory(batch_size, num_steps, model.vocab_size)
  model = model.for_evaluation(num_steps)
  # Calls of one size for every split, so one compiled program; the padding windows at the
  # end have zero weight.
  num_windows = len(inputs)
  windows_per_call = min(num_windows, MAX_EVAL_WINDOWS_PER_CALL)
  num_calls = -(-num_windows // windows_per_call)
  padding = ((0, num_calls * windows_per_call - num_windows), (0, 0), (0, 0))
  inputs, targets, weights = (np.pad(x, padding) for x in (inputs, targets, weights))
  # Placed alike wherever the params come from (the pmapped state, a checkpoint, NumPy):
  # otherwise each source compiled the step again.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  params = jax.device_put(params, device, may_alias=False)
  carry = jax.device_put(model.initial_carry(batch_size), device)
  nll_sum = jax.device_put(np.zeros((), np.float32), device)
  start = last_log = time.monotonic()
  for call in range(num_calls):
    chunk = slice(call * windows_per_call, (call + 1) * windows_per_call)
    carry, nll_sum = eval_step(
        params, carry, nll_sum, inputs[chunk], targets[chunk], weights[chunk], model=model
    )
    if call + 1 < num_calls:
      nll_sum.block_until_ready()  # paces the loop by the work done, for the progress lines
      now = time.monotonic()
      if call == 0:  # the rate is timed from here: the first call compiles
        first_call_end = now
      elif now - last_log >= log_every_seconds:
        done = (call + 1) * windows_per_call
        left = (now - first_call_end) / (done - windows_per_call) * (num_windows - done)
        logging.info("scoring %s: %d of %d windows, %s, about %s left", split, done,
                     num_windows, reporting.format_seconds(now - start),
                     reporting.format_seconds(left))
        last_log = now
  tokens_scored = int(weights.sum())
  return math.exp(float(nll_sum) / tokens_scored), tokens_scored


def first_replica(tree: Any) -> Any:
  """The copy on this process's first device of a pmap-replicated tree."""
  return jax.tree.map(lambda x: x.addressable_shards[0].data.reshape(x.shape[1:]), tree)


def to_numpy(tree: Any) -> Any:
  return jax.tree.map(np.asarray, tree)


def count_params(params: Any) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


# A workdir's checkpoints only fit a config that agrees on these: the model's shapes;
# the windows of an epoch, by which checkpoints number their steps and the
# learning-rate schedule and a mid-epoch resume find their place; and the seed, which
# drew the initial parameters and draws every step's dropout (another would give a run
# of neither seed, recorded as the second).
FIXED_FIELDS = (
    "dataset", "max_vocab_size", "batch_size", "model.embed_dim", "model.hidden_size",
    "model.num_layers", "model.tie_embeddings", "model.output_bias", "model.output_projection",
    "num_steps", "max_steps_per_epoch", "eval_batch_size", "seed",
)

# Fields a rerun of a finished run may change: it only tests the run, so the others would
# change nothing but what config.json and results.json say the run trained with.
# (lstm_implementation and on_nonfinite are not among them: cuDNN's LSTM drops other
# units, and skipped steps are a run's history.)
RETEST_FIELDS = (
    "num_epochs", "data_dir", "log_every_steps", "checkpoint_every_steps", "model.unroll",
)


def vocab_digest(vocab: tuple[str, ...]) -> str:
  """SHA-256 of the words in id order: a resumed run must map ids to the same words."""
  return hashlib.sha256("\n".join(vocab).encode("utf-8")).hexdigest()


def corpus_digests(corpus: data.Corpus) -> dict[str, str]:
  """SHA-256 of the train and valid ids: a resumed run must train and choose its best
  epoch on the same text (a `text` corpus edited between launches, same vocabulary)."""
  return {split: hashlib.sha256(np.asarray(corpus.split(split), np.int32).tobytes()).hexdigest()
          for split in ("train", "valid")}


def check_vocabulary(
    saved_meta: dict[str, Any], vocab: tuple[str, ...], config: ml_collections.ConfigDict,
    subject: str, consequence: str,
) -> None:
  """Raises ConfigError if a checkpoint's vocabulary digest is not `vocab`'s.

  Checkpoints from before the digest was saved are not checked.
  """
  digest = vocab_digest(vocab)
  if saved_meta.get("vocab_digest", digest) != digest:
    raise ConfigError(
        f"{subject} trained on another vocabulary than the corpus of "
        f"dataset={config.dataset!r}, data_dir={config.data_dir!r} gives now (its words or "
        f"their ids differ){consequence}")


def config_value(tree: dict, field: str) -> Any:
  """tree's value of a dotted field ("model.unroll"); None where a part is missing."""
  for part in field.split("."):
    tree = tree.get(part) if isinstance(tree, dict) else None
  return tree


def config_differences(ours: dict, saved: dict, fields: Any, label: str) -> list[str]:
  """'field=ours (label: saved)' for each of `fields` whose values differ."""
  return [f"{field}={config_value(ours, field)!r} ({label}: {config_value(saved, field)!r})"
          for field in fields if config_value(ours, field) != config_value(saved, field)]


def flat_fields(tree: dict, prefix: str = "") -> list[str]:
  """The dotted names of a nested config dict's leaves."""
  return [name for key, value in tree.items()
          for name in (flat_fields(value, f"{prefix}{key}.") if isinstance(value, dict)
                       else [f"{prefix}{key}"])]


class NonFiniteError(UserError):
  """A step produced a non-finite loss or gradient and on_nonfinite is 'stop'."""


class Interrupted(Exception):
  """SIGTERM, SIGINT or SIGHUP arrived (or SIGINT during the test); a checkpoint is saved,
  unless `at_once`.

  `signum` says which signal. `at_once`: a second Ctrl-C, whose KeyboardInterrupt may
  have cut through JAX mid-compile or mid-dispatch, or through a checkpoint's write.
  """

  def __init__(self, message: str, signum: int, at_once: bool = False):
    super().__init__(message)
    self.signum = signum
    self.at_once = at_once


def _install_handler(signums: tuple[int, ...], handler: Any) -> dict[int, Any]:
  """Installs `handler` for each of `signums` not ignored; returns the handlers it replaced.

  One process and the main thread only (Python's rule; several processes leave
  SIGTERM to JAX's preemption service). A signal the process ignores (SIGHUP
  under nohup) stays ignored. Give the result to `_restore_handlers`.
  """
  previous = {}
  if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
    for signum in signums:
      if signal.getsignal(signum) != signal.SIG_IGN:
        previous[signum] = signal.signal(signum, handler)
  return previous


def _restore_handlers(previous: dict[int, Any]) -> None:
  for signum, handler in previous.items():
    signal.signal(signum, handler)


def _no_interrupt_traceback(record: std_logging.LogRecord) -> bool:
  """False for a log record that carries a KeyboardInterrupt: orbax logs the one that
  abandons a checkpoint's write (a third Ctrl-C) with its traceback, above the command's
  one line."""
  return not (record.exc_info and record.exc_info[0] is not None
              and issubclass(record.exc_info[0], KeyboardInterrupt))


class StopSignals:
  """Turns SIGTERM, SIGINT and SIGHUP (a closed terminal) into a stop at a step boundary.

  One process: while active, these signals only set `received`; a second one
  acts as usual (Ctrl-C: KeyboardInterrupt), except while a checkpoint is being
  written (`writing`), where it waits for the checkpoint and a third one acts.
  One that the process ignores (SIGHUP under nohup) stays ignored. Several
  processes: JAX's preemption service (started by jax.distributed.initialize)
  catches SIGTERM on any process and agrees with the others on one step at which
  all of them stop, so that they save the same checkpoint; SIGINT and SIGHUP keep
  their defaults there.
  """

  def __init__(self):
    self.received: int | None = None
    self._previous: dict[int, Any] = {}
    self._writing: int | None = None  # the step of the checkpoint being written
    self.abandoned: int | None = None  # the step whose write a last signal gave up on
    self._held = False

  def _handler(self, signum, frame):
    name = signal.Signals(signum).name
    if self.received is not None:
      if self._writing is not None and not self._held:
        # Raised inside orbax's wait, a KeyboardInterrupt left the stop's checkpoint
        # half-written (the run resumed from the one before) under pages of tracebacks.
        self._held = True
        logging.warning("%s again: writing checkpoint %d first; once more to abandon it",
                        name, self._writing)
        return
      self.abandoned = self._writing
      signal.signal(signum, self._previous[signum])  # give up waiting
      signal.raise_signal(signum)
    self.received = signum
    logging.warning("%s received: stopping after this step", name)

  @contextlib.contextmanager
  def writing(self, step: int) -> Iterator[None]:
    """While checkpoint `step` is written, a second signal waits for it (see the class)."""
    self._writing = step
    logging.get_absl_logger().addFilter(_no_interrupt_traceback)
    try:
      yield
    finally:
      logging.get_absl_logger().removeFilter(_no_interrupt_traceback)
      self._writing, self._held = None, False

  def stop_at(self, global_step: int) -> bool:
    """True if the run must stop after `global_step`; call it after every step."""
    if jax.process_count() > 1 and multihost_utils.reached_preemption_sync_point(global_step):
      self.received = signal.SIGTERM
    return self.received is not None

  def __enter__(self) -> "StopSignals":
    self._previous = _install_handler((signal.SIGTERM, signal.SIGINT, signal.SIGHUP),
                                      self._handler)
    return self

  def __exit__(self, *exc_info) -> None:
    _restore_handlers(self._previous)


def check_fixed_fields(
    config: ml_collections.ConfigDict, saved_config: dict,
    subject: str = "the workdir holds checkpoints of another run",
    remedy: str = "use a new --workdir or the checkpoint's values",
    fields: tuple[str, ...] = FIXED_FIELDS,
) -> None:
  """Raises ConfigError if `config` and a checkpoint's config differ in one of `fields`.

  A field missing on one side is None there.
  """

  differences = config_differences(config.to_dict(), saved_config, fields, "checkpoint")
  if differences:
    raise ConfigError(f"{subject}: {', '.join(differences)}; {remedy}")


def check_retest_config(
    config: ml_collections.ConfigDict, trained_config: dict, epochs_done: int
) -> None:
  """Raises ConfigError if a rerun of a run that has finished training changes a field
  outside RETEST_FIELDS: it only tests the run, so the change would relabel it.

  A field the checkpoint's config lacks (saved by older code) is not compared.
  """
  ours = config.to_dict()
  compared = [field for field in flat_fields(ours)
              if field not in RETEST_FIELDS and config_value(trained_config, field) is not None]
  differences = config_differences(ours, trained_config, compared, "trained")
  if differences:
    raise ConfigError(
        f"the run is trained ({epochs_done} epochs done, num_epochs={config.num_epochs}), "
        "so this command only tests it: "
        f"{', '.join(differences)} would change nothing but the config its results name; "
        "use the run's values, or a new --workdir")


def train_epoch(
    p_train_step: Any,
    state: train_state.TrainState,
    carry: models.Carry,
    device_inputs: np.ndarray,
    device_targets: np.ndarray,
    dropout_key: jax.Array,
    *,
    first_step: int = 0,
    totals: dict[str, float] | None = None,
    stop_after: Any = lambda step: False,
    log_every_steps: int,
    reporter: reporting.Reporter | None = None,
    epoch: int = 1,
    learning_rate: float = 0.0,
    on_nonfinite: str = "stop",
    clock: Callable[[], float] = time.monotonic,
) -> tuple[train_state.TrainState, models.Carry, dict[str, float], int]:
  """Runs the pmapped step over the epoch's windows from `first_step`.

  Args:
    p_train_step: `train_step` under `jax.pmap`, metrics replicated out.
    state, carry: replicated over the local devices.
    device_inputs, device_targets: [steps, local devices, rows, T], the whole epoch.
    first_step: the window to start at (a resumed epoch starts mid-way).
    totals: the epoch's sums so far (cross_entropy_sum, kl_sum, num_tokens,
      nonfinite_steps), for a resumed epoch.
    stop_after: stop_after(step) is asked after each step (0-based window
      index); True returns early, for a checkpoint or a signal.
    reporter: gets a "train" record every `log_every_steps` steps (and when
      stopping); None reports nothing.
    epoch, learning_rate: for the records.
    on_nonfinite: 'stop' raises NonFiniteError at a non-finite step; 'skip'
      only counts them (the step itself made no update).
    clock: seconds, for the records' tokens_per_second (train_and_evaluate's
      reporting.RunningClock leaves out the time the process was stopped).

  Returns:
    the new state and carry, the epoch's sums, and the next window to run
    (len(device_inputs) when the epoch is done).
  """
  num_steps = len(device_inputs)
  totals = dict(totals or {"cross_entropy_sum": 0.0, "kl_sum": 0.0, "num_tokens": 0.0,
                           "nonfinite_steps": 0.0})
  pending_metrics = []
  interval_start = clock()
  step = first_step
  while step < num_steps:
    state, carry, metrics = p_train_step(
        state, carry, device_inputs[step], device_targets[step], dropout_key
    )
    # At most two steps in flight: one queued step keeps the device busy, and
    # XLA:CPU's all-reduce deadlocks when many multi-device steps are queued
    # (jax 0.10.2, 2 host devices). This waits without copying to the host.
    if pending_metrics:
      jax.block_until_ready(pending_metrics[-1])
    pending_metrics.append(metrics)
    step += 1
    if reporter is not None:
      reporter.advance()
    stopping = stop_after(step - 1)
    if step % log_every_steps and step < num_steps and not stopping:
      continue
    # The only host transfer: metrics stay on the device between intervals.
    window = jax.device_get(pending_metrics)
    _check_finite(window, step - len(window), on_nonfinite)
    pending_metrics = []
    interval = {k: sum(float(m[k]) for m in window) for k in totals}
    for k in totals:
      totals[k] += interval[k]
    if reporter is not None:
      loss = _per_token(interval["cross_entropy_sum"], interval["num_tokens"])
      finite_norms = [float(m["grad_norm"]) for m in window if not m["nonfinite_steps"]]
      reporter.add({
          "kind": "train",
          "epoch": epoch,
          "step": (epoch - 1) * num_steps + step,
          "step_in_epoch": step,
          "loss": loss,
          "perplexity": math.exp(loss),
          "kl": _per_token(interval["kl_sum"], interval["num_tokens"]),
          "grad_norm": float(np.mean(finite_norms)) if finite_norms else math.nan,
          "learning_rate": learning_rate,
          "tokens_per_second": interval["num_tokens"] / (clock() - interval_start),
          "nonfinite_steps": int(interval["nonfinite_steps"]),
      })
    interval_start = clock()
    if stopping:
      break
  return state, carry, totals, step


def _per_token(total: float, num_tokens: float) -> float:
  """total / num_tokens; NaN for no tokens (every step skipped as non-finite)."""
  return total / num_tokens if num_tokens else math.nan


def _check_finite(window: list[dict[str, Any]], first_step: int, on_nonfinite: str) -> None:
  """Raises NonFiniteError (on_nonfinite='stop') at the window's first non-finite step.

  window: the fetched metrics of consecutive steps, the first being step
  first_step + 1 of the epoch (steps count from 1, as in the log lines).
  """
  bad = [i for i, m in enumerate(window) if m["nonfinite_steps"]]
  if not bad:
    return
  if on_nonfinite == "skip":
    logging.warning(
        "skipped %d step(s) with a non-finite loss or gradient (the first: step %d)",
        len(bad), first_step + bad[0] + 1,
    )
    return
  finite = window[: bad[0]]
  last_loss = (
      f"{float(finite[-1]['cross_entropy_sum']) / float(finite[-1]['num_tokens']):.4f} "
      f"at step {first_step + bad[0]}" if finite else "before this log interval"
  )
  raise NonFiniteError(
      f"step {first_step + bad[0] + 1} of the epoch has a non-finite loss or gradient "
      f"(the last finite loss was {last_loss})"
  )


class _Stopped(Exception):
  """SIGTERM or SIGHUP during the final test, raised as SIGINT raises KeyboardInterrupt."""

  def __init__(self, signum: int):
    super().__init__(signum)
    self.signum = signum


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
  """SIGTERM and SIGHUP raise _Stopped while active (one process, main thread only).

  The final test has no step boundary to stop at, and by default SIGTERM would end
  the process without a word.
  """

  def handler(signum, frame):
    raise _Stopped(signum)

  previous = _install_handler((signal.SIGTERM, signal.SIGHUP), handler)
  try:
    yield
  finally:
    _restore_handlers(previous)


def _interrupted(signum: int, step: int, checkpoints: Checkpoints) -> Interrupted:
  return Interrupted(
      f"stopped by {signal.Signals(signum).name}: checkpoint {step} saved in "
      f"{checkpoints.directory}; run the same command again to resume",
      signum,
  )


def _interrupted_at_once(
    signum: int, checkpoints: Checkpoints, abandoned: int | None = None
) -> Interrupted:
  """abandoned: the step of a checkpoint whose write was given up on, which may finish."""
  kept = checkpoints.latest_step(other_than=abandoned)
  name = signal.Signals(signum).name
  if abandoned is not None:
    return Interrupted(
        f"stopped by {name} at once, while writing checkpoint {abandoned} in "
        f"{checkpoints.directory}: the same command resumes from it if the write finished, "
        + (f"else from checkpoint {kept}" if kept is not None else "else from the start"),
        signum, at_once=True)
  return Interrupted(
      f"stopped by {name} at once: "
      + (f"checkpoint {kept} in {checkpoints.directory} is the latest; run the same command "
         "again to resume from it" if kept is not None else "no checkpoint was written yet"),
      signum, at_once=True,
  )


class TrainedRun(NamedTuple):
  """A run directory's best parameters with what it takes to use them."""

  config: ml_collections.ConfigDict
  corpus: data.Corpus
  model: models.LSTMLanguageModel
  params: Any
  checkpoint_step: int


def load_trained(workdir: str | Path) -> TrainedRun:
  """The best parameters so far of a run directory, with its config, corpus and model.

  A run trained with the cuDNN LSTM is loaded with the scan off NVIDIA GPUs.

  Raises UserError (one line) for a folder that is not a run or has no checkpoint yet.
  """
  workdir = Path(workdir).expanduser()
  config_file = workdir / "config.json"
  fileio.check_run_directory(workdir)
  if not config_file.is_file():
    raise UserError(f"{workdir} is not a tied_lm run (no config.json)")
  if not fileio.has_checkpoint(workdir):
    raise UserError(
        f"{workdir} has no checkpoint yet: training writes the first one after "
        "checkpoint_every_steps steps or one epoch"
    )
  saved_config = fileio.read_json(config_file)
  if not (isinstance(saved_config, dict) and isinstance(saved_config.get("model"), dict)
          and {"dataset", "data_dir", "max_vocab_size"} <= saved_config.keys()):
    raise UserError(f"{config_file} does not describe a tied_lm run (it needs dataset, "
                    "data_dir, max_vocab_size and model)")
  config = ml_collections.ConfigDict(saved_config)
  if config.model.get("lstm_implementation") == "cudnn" and jax.default_backend() != "gpu":
    # cuDNN runs on NVIDIA GPUs only; the scan computes the same from the same parameters.
    config.model.lstm_implementation = "scan"
  step, params, meta = Checkpoints(workdir, read_only=True).restore_best_params()
  if "config" in meta:  # config.json edited, or checkpoints copied from another run
    # Not the seed, which reading the parameters does not need: a launch of older code
    # could change it in config.json and be killed before its first checkpoint.
    check_fixed_fields(config, meta["config"], f"{config_file} does not match checkpoint {step}",
                       "restore the run's own config.json",
                       tuple(field for field in FIXED_FIELDS if field != "seed"))
  if meta.get("best_epoch") == 0:
    raise UserError(
        f"{workdir} has no finished epoch yet (checkpoint {step} is within epoch 1): its best "
        "parameters are still the initial ones")
  # Fields the checkpoint does not fix, edited by hand: one line, not a traceback later.
  try:
    problems = models.field_problems(config.model, "model.")
  except (KeyError, TypeError) as error:
    problems = [f"a model field is missing or of the wrong type ({error})"]
  if not isinstance(config.data_dir, str):
    problems.append(f"data_dir={config.data_dir!r} must be a folder's name or ''")
  if problems:
    raise UserError(f"{config_file}: {problems[0]}; restore the run's own config.json")
  corpus = data.load_corpus(config.dataset, config.data_dir, config.max_vocab_size)
  model = make_model(config, corpus.vocab_size)
  check_vocabulary(meta, corpus.vocab, config, f"{workdir} was",
                   ": its scores would be of the wrong words")
  return TrainedRun(config, corpus, model, jax.tree.map(jnp.asarray, params), step)


def _gather_carry(carry: models.Carry) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
  """The carry of every row of the global batch as NumPy [batch, H] leaves.

  Saved as [batch, H], not per device, so that a run resumes mid-epoch on
  another number of devices: device_windows gives each device a contiguous
  block of rows, and _local_carry splits the rows the same way.
  """
  local = to_numpy(carry)
  if jax.process_count() > 1:
    local = multihost_utils.process_allgather(local, tiled=True)
  return jax.tree.map(lambda x: x.reshape(-1, x.shape[-1]), local)


def _pmap_sharding(devices: list[jax.Device]) -> jax.NamedSharding:
  """The layout of the pmapped step's per-device inputs and outputs: axis AXIS over `devices`."""
  return jax.NamedSharding(jax.sharding.Mesh(np.array(devices), (AXIS,)), jax.P(AXIS))


def replicate(tree: Any, devices: list[jax.Device] | None = None) -> Any:
  """One copy of `tree` per device (default: this process's), stacked on a leading axis.

  Laid out as the pmapped step returns its state and carry, so that the step
  fed its own outputs reuses the program compiled for its first call; with
  flax.jax_utils.replicate's layout the step compiled three times.
  """
  devices = devices or jax.local_devices()
  sharding = _pmap_sharding(devices)
  return jax.tree.map(
      lambda x: jax.device_put(np.broadcast_to(np.asarray(x), (len(devices), *np.shape(x))),
                               sharding),
      tree,
  )


def _local_carry(carry: Any, like: models.Carry) -> models.Carry:
  """This process's rows of a saved carry, split over its local devices, structured like `like`.

  carry: leaves [batch, H], or [devices, rows, H] as checkpoints before the
  per-row layout saved them; either is split over this run's devices.
  """
  count = jax.local_device_count()
  start = jax.process_index() * count
  sharding = _pmap_sharding(jax.local_devices())
  leaves = []
  for x in jax.tree.leaves(carry):
    x = np.asarray(x)
    per_device = x.reshape(jax.device_count(), -1, x.shape[-1])
    leaves.append(jax.device_put(per_device[start : start + count], sharding))
  return jax.tree.unflatten(jax.tree.structure(like), leaves)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, command: str | None = None
) -> dict[str, Any]:
  """Trains, evaluates every epoch, checkpoints, and tests the best params.

  Writes `workdir/metrics.jsonl` (the records of `tied_lm.reporting`),
  TensorBoard events in `workdir/tensorboard/`, `workdir/results.json`, and
  appends this start (`command`, commit, host, resumed step) to
  `workdir/launches.jsonl`; returns the results. Running it again on the
  same workdir resumes from the last checkpoint: mid-epoch ones included, with
  the data position, the recurrent state and the epoch's running sums.

  Raises:
    Interrupted: after SIGTERM, SIGINT or SIGHUP, once the checkpoint is saved (or at
      once, `at_once`, after a second Ctrl-C).
    UserError: for bad input, and if another process trains in the workdir.
  """
  num_devices = jax.device_count()
  validate_config(config, num_devices)
  workdir = Path(workdir).expanduser()
  fileio.check_run_directory_writable(workdir)
  fileio.check_new_run_has_its_own_folder(workdir)
  corpus = data.load_corpus(config.dataset, config.data_dir, config.max_vocab_size)
  if (config.data_dir or config.dataset == "text") and not Path(config.data_dir).is_absolute():
    # Saved as typed, it named another folder for evaluate and sample run from elsewhere;
    # and a text corpus named by $TIED_LM_DATA_DIR alone was saved as "". (A closed corpus
    # is found by its checksums wherever it is.) After the loading, whose errors name the
    # setting the user gave. A copy: the caller's config stays as it was.
    config = ml_collections.ConfigDict(config.to_dict())
    config.data_dir = str(data.resolve_data_dir(config.data_dir).absolute())
  inputs, targets = data.train_windows(corpus.train, config.batch_size, config.num_steps)
  for split in ("valid", "test"):  # before training, not after it
    data.check_eval_batch_size(config.eval_batch_size, corpus.split(split), split)
  check_eval_memory(config.eval_batch_size, config.num_steps, corpus.vocab_size)
  rows = config.batch_size // num_devices
  problem = logits_memory_problem(
      "batch_size", config.batch_size, rows, config.num_steps, corpus.vocab_size,
      jax.local_device_count())
  if problem:
    raise ConfigError(problem)
  problem = parameters_memory_problem(make_model(config, corpus.vocab_size),
                                      jax.local_device_count())
  if problem:
    raise ConfigError(problem)
  fileio.make_run_directory(workdir)
  # Process 0 speaks for all: the others of a multi-process run share its workdir.
  lock = fileio.lock_directory(workdir) if jax.process_index() == 0 else None
  try:
    if not fileio.has_checkpoint(workdir):
      reporting.check_nothing_to_lose(workdir)
    return _train_and_evaluate(config, workdir, command, corpus, inputs, targets)
  finally:
    if lock is not None:
      lock.close()


def _train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: Path, command: str | None,
    corpus: data.Corpus, inputs: np.ndarray, targets: np.ndarray,
) -> dict[str, Any]:
  """train_and_evaluate's work once the workdir is checked, made and locked.

  inputs, targets: the epoch's windows, [steps, batch, num_steps].
  """
  num_devices = jax.device_count()
  device_inputs, device_targets = (
      data.device_windows(x, jax.process_index(), jax.process_count(), jax.local_device_count())
      for x in (inputs, targets)
  )
  steps_per_epoch = len(inputs)
  if config.max_steps_per_epoch:
    steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
  device_inputs, device_targets = (
      device_inputs[:steps_per_epoch], device_targets[:steps_per_epoch]
  )

  model = make_model(config, corpus.vocab_size)
  state = create_train_state(config, model, steps_per_epoch)
  num_params = count_params(state.params)

  rows_per_device = device_inputs.shape[2]

  def zero_carry() -> models.Carry:  # a new one each time: the step donates its carry
    return replicate(model.initial_carry(rows_per_device))

  checkpoints = Checkpoints(workdir)
  arrays = {
      "state": to_numpy(state),
      "best_params": to_numpy(state.params),
      "carry": _gather_carry(zero_carry()),
  }
  meta = {
      "epoch": 0,  # epochs completed
      "step_in_epoch": 0,  # windows of the next epoch already trained
      "epoch_totals": None,
      "epoch_train_seconds": 0.0,  # running time, pauses left out (reporting.RunningClock)
      "epoch_paused_seconds": 0.0,
      "best_epoch": 0,
      "best_valid_perplexity": None,
      "records": [],  # what metrics.jsonl holds, see tied_lm.reporting
      "config": config.to_dict(),
      "vocab_digest": vocab_digest(corpus.vocab),
      "corpus_digests": corpus_digests(corpus),
  }

  def check_same_run(saved: dict[str, Any]) -> None:
    check_fixed_fields(config, saved.get("config", {}))
    # A checkpoint inside an epoch is of a launch that did not finish it (a rerun that
    # gave more epochs): its config need not be the one the tested parameters trained with.
    if saved.get("epoch", 0) >= config.num_epochs and not saved.get("step_in_epoch"):
      check_retest_config(config, saved.get("config", {}), saved["epoch"])
    remedy = "; use the corpus they were trained on, or a new --workdir"
    check_vocabulary(saved, corpus.vocab, config, "the workdir's checkpoints were", remedy)
    # Checkpoints from before the digests were saved are not checked.
    changed = [split for split, digest in meta["corpus_digests"].items()
               if saved.get("corpus_digests", {}).get(split, digest) != digest]
    if changed:
      raise ConfigError(
          f"the workdir's checkpoints were trained on another {' and '.join(changed)} text "
          f"than the corpus of dataset={config.dataset!r}, data_dir={config.data_dir!r} "
          f"gives now (same vocabulary){remedy}")

  restored = checkpoints.restore_latest(arrays, check_same_run)
  # Once the checkpoints fit this run: a refused resume is its one error line alone.
  logging.info(
      "%s: vocab %d, %d train tokens, %d steps/epoch, %d params, %d devices",
      config.dataset, corpus.vocab_size, len(corpus.train), steps_per_epoch, num_params,
      num_devices,
  )
  carry = zero_carry()
  restored_step = None
  if restored is not None:
    restored_step, arrays, restored_meta = restored
    meta.update(restored_meta, config=config.to_dict())
    if "epoch_paused_seconds" not in restored_meta and meta["epoch_train_seconds"]:
      # Saved mid-epoch before stops were counted: its time so far may hold some.
      meta["epoch_paused_seconds"] = None
    state = arrays["state"]
    if meta["step_in_epoch"]:
      carry = _local_carry(arrays["carry"], like=carry)
    logging.info(
        "resumed from checkpoint %d in %s (%s)", restored_step, checkpoints.directory,
        f"epoch {meta['epoch'] + 1}, window {meta['step_in_epoch']}"
        if meta["epoch"] < config.num_epochs else f"training finished at epoch {meta['epoch']}",
    )
    if (meta["epoch"], meta["step_in_epoch"]) > (config.num_epochs, 0):
      logging.warning(
          "num_epochs=%d, but the run has %d epochs done%s: it is tested as trained, and "
          "its results say epochs_completed=%d", config.num_epochs, meta["epoch"],
          f" and {meta['step_in_epoch']} steps of epoch {meta['epoch'] + 1}"
          if meta["step_in_epoch"] else "", meta["epoch"])
  if jax.process_index() == 0:
    # What a kill during a write of the run's own files left (evaluate and the analysis
    # commands write theirs beside them, maybe now).
    run_files = [n for n, kind in fileio.RUN_DIRECTORY_LAYOUT.items() if kind == "file"]
    for path in fileio.remove_unfinished_writes(workdir, run_files):
      logging.info("removed %s, left by a process killed while writing it", path)
    # The config in effect, for tied_lm.summarize and readers; written only once the
    # checkpoints are known to fit it, so that a refused resume leaves the run as it was.
    atomic_write(workdir / "config.json", config.to_json(indent=2) + "\n")
    provenance.record_launch(workdir, command, restored_step, meta["epoch"], num_params)
  # Records of a finished run's earlier test are replaced by this one's.
  meta["records"] = [r for r in meta["records"] if r["kind"] != "test"]
  if meta["epoch"] < config.num_epochs and jax.process_index() == 0:
    # A finished run given more epochs: its results.json describes the shorter run and
    # would outlive an interruption of the longer one (readers take it as the result).
    (workdir / "results.json").unlink(missing_ok=True)
  reporter = reporting.Reporter(
      workdir, meta["records"], writer=jax.process_index() == 0, config=config,
      resumed_step=restored_step,
  )
  if (restored is not None and jax.process_index() == 0
      and not reporting.records_match(workdir, meta["records"])):
    # A kill between a checkpoint's save and this file's rewrite left it behind the
    # checkpoint: readers (summarize, reproduce) would see epochs short until the next save.
    reporter.write_metrics()

  p_train_step = pmap_train_step(
      config.loss, skip_nonfinite=config.on_nonfinite == "skip",
      max_distinct_targets=distinct_targets_bound(
          targets[:steps_per_epoch], num_devices, config.loss.augmented),
  )
  state = replicate(state)
  dropout_key = jax.random.key(config.seed + 1)
  schedule = learning_rate_schedule(config.optim, steps_per_epoch)
  signals = StopSignals()

  def save(epoch_done: int, step_in_epoch: int, state, carry) -> int:
    """Checkpoints the replicated state and carry after this many steps; returns the step."""
    step = epoch_done * steps_per_epoch + step_in_epoch
    host_state = to_numpy(first_replica(state))
    if not all(np.isfinite(x).all() for x in jax.tree.leaves(host_state.params)):
      # Finite losses and gradients can still give an overflowing update; such a
      # state must not replace the last good checkpoint.
      kept = checkpoints.latest_step()
      raise NonFiniteError(
          f"the parameters after step {step} are not finite (an update overflowed: is the "
          "learning rate too large?); "
          + (f"checkpoint {kept} in {checkpoints.directory} is kept"
             if kept is not None else "no checkpoint was written"))
    arrays["state"] = host_state
    arrays["carry"] = _gather_carry(carry)
    meta.update(epoch=epoch_done, step_in_epoch=step_in_epoch)
    with signals.writing(step):
      checkpoints.save(step, arrays, meta)
      reporter.write_metrics()  # metrics.jsonl always matches the newest checkpoint
    return step

  final_metrics = None  # TensorBoard's hparams, once the test is scored
  try:
    with signals, reporting.RunningClock() as clock:
      for epoch in range(meta["epoch"] + 1, config.num_epochs + 1):
        state, carry = _train_one_epoch(
            epoch, state, carry, p_train_step, device_inputs, device_targets, dropout_key,
            config=config, meta=meta, schedule=schedule, reporter=reporter, signals=signals,
            save=save, checkpoints=checkpoints, clock=clock,
        )
        params = first_replica(state.params)
        eval_start, eval_paused = clock.read()
        valid_perplexity, valid_tokens = evaluate(
            model, params, corpus.valid, config.eval_batch_size, config.num_steps, "valid"
        )
        if (meta["best_valid_perplexity"] is None
            or valid_perplexity < meta["best_valid_perplexity"]):
          meta.update(best_epoch=epoch, best_valid_perplexity=valid_perplexity)
          arrays["best_params"] = to_numpy(params)
        totals = meta["epoch_totals"]
        eval_end, eval_end_paused = clock.read()
        epoch_seconds = meta["epoch_train_seconds"] + (eval_end - eval_start)
        paused_seconds = (None if meta["epoch_paused_seconds"] is None
                          else meta["epoch_paused_seconds"] + (eval_end_paused - eval_paused))
        history = [r for r in meta["records"] if r["kind"] == "epoch"]
        reporter.add({
            "kind": "epoch",
            "epoch": epoch,
            "step": epoch * steps_per_epoch,
            "learning_rate": float(schedule((epoch - 1) * steps_per_epoch)),
            "train_perplexity": math.exp(
                _per_token(totals["cross_entropy_sum"], totals["num_tokens"])),
            "train_kl": _per_token(totals["kl_sum"], totals["num_tokens"]),
            "nonfinite_steps": int(totals["nonfinite_steps"]),
            "valid_perplexity": valid_perplexity,
            "valid_tokens_scored": valid_tokens,
            "best_valid_perplexity": meta["best_valid_perplexity"],
            "best_epoch": meta["best_epoch"],
            "train_tokens_per_second": totals["num_tokens"] / meta["epoch_train_seconds"],
            "epoch_seconds": epoch_seconds,
            "wall_seconds": (history[-1]["wall_seconds"] if history else 0.0) + epoch_seconds,
            "paused_seconds": paused_seconds,
        })
        meta.update(epoch_totals=None, epoch_train_seconds=0.0, epoch_paused_seconds=0.0)
        carry = zero_carry()
        saved = save(epoch, 0, state, carry)
        if signals.received is not None and epoch < config.num_epochs:
          raise _interrupted(signals.received, saved, checkpoints)

    def test_interrupted(signum: int) -> Interrupted:  # the training is saved: only the test left
      return Interrupted(
          f"stopped by {signal.Signals(signum).name} before the test evaluation ended: "
          f"checkpoint {checkpoints.latest_step()} in {checkpoints.directory} holds every "
          "epoch; run the same command again to evaluate", signum)

    if signals.received is not None:  # during the last epoch: stop now, as asked
      raise test_interrupted(signals.received)
    try:
      with _signals_raise():
        test_perplexity, test_tokens = evaluate(
            model, arrays["best_params"], corpus.test, config.eval_batch_size, config.num_steps,
            "test"
        )
    except KeyboardInterrupt:
      raise test_interrupted(signal.SIGINT) from None
    except _Stopped as stopped:
      raise test_interrupted(stopped.signum) from None
    reporter.add({
        "kind": "test",
        # The checkpoint's step: after the records of an epoch begun and cut by a rerun
        # with fewer epochs.
        "step": meta["epoch"] * steps_per_epoch + meta["step_in_epoch"],
        "best_epoch": meta["best_epoch"],
        "best_valid_perplexity": meta["best_valid_perplexity"],
        "test_perplexity": test_perplexity,
        "test_tokens_scored": test_tokens,
    })
    reporter.write_metrics()
    final_metrics = {
        "hparam/valid_perplexity": meta["best_valid_perplexity"],
        "hparam/test_perplexity": test_perplexity,
    }
  except KeyboardInterrupt:  # a second Ctrl-C (the first, with several processes)
    raise _interrupted_at_once(signal.SIGINT, checkpoints, signals.abandoned) from None
  finally:
    reporter.close(final_metrics)
  history = [r for r in meta["records"] if r["kind"] == "epoch"]
  results = {
      "dataset": config.dataset,
      "valid_perplexity": meta["best_valid_perplexity"],
      "best_epoch": meta["best_epoch"],
      "test_perplexity": test_perplexity,
      "test_tokens_scored": test_tokens,
      "valid_tokens_scored": history[-1]["valid_tokens_scored"],
      "eval_batch_size": config.eval_batch_size,
      "num_params": num_params,
      "epochs_completed": meta["epoch"],
      "train_tokens_per_second": float(
          np.median([h["train_tokens_per_second"] for h in history])
      ),
      "wall_seconds": history[-1]["wall_seconds"],
      "versions": provenance.versions(),
      "devices": provenance.device_names(),
      "device_kind": jax.devices()[0].device_kind,
      "config": config.to_dict(),
  }
  if jax.process_index() == 0:
    provenance.write_json(workdir / "results.json", results)
  return results


def _train_one_epoch(
    epoch, state, carry, p_train_step, device_inputs, device_targets, dropout_key, *,
    config, meta, schedule, reporter, signals, save, checkpoints, clock,
):
  """The steps of one epoch from meta's position, with the checkpoints within it.

  Leaves the epoch's sums in meta["epoch_totals"], its training time in
  meta["epoch_train_seconds"] and the time it was stopped in meta["epoch_paused_seconds"]
  (both by `clock`, a running reporting.RunningClock); raises Interrupted after a
  signal's checkpoint.
  """
  steps_per_epoch = len(device_inputs)
  learning_rate = float(schedule((epoch - 1) * steps_per_epoch))
  step_in_epoch = meta["step_in_epoch"]
  totals = meta["epoch_totals"]
  segment_start, segment_paused = clock.read()

  def stop_after(step):
    every = config.checkpoint_every_steps
    stop = signals.stop_at((epoch - 1) * steps_per_epoch + step + 1)
    return stop or bool(every and (step + 1) % every == 0)

  reporter.start_epoch(epoch, steps_per_epoch, step_in_epoch, clock=clock.seconds)
  try:
    while True:
      try:
        state, carry, totals, step_in_epoch = train_epoch(
            p_train_step, state, carry, device_inputs, device_targets, dropout_key,
            first_step=step_in_epoch, totals=totals, stop_after=stop_after,
            log_every_steps=config.log_every_steps, on_nonfinite=config.on_nonfinite,
            reporter=reporter, epoch=epoch, learning_rate=learning_rate, clock=clock.seconds,
        )
      except NonFiniteError as error:
        kept = checkpoints.latest_step()
        raise NonFiniteError(
            f"epoch {epoch}: {error}; "
            + (f"checkpoint {kept} in {checkpoints.directory} is kept"
               if kept is not None else "no checkpoint was written yet")
            + "; --config.on_nonfinite=skip skips such steps instead"
        ) from None
      now, paused = clock.read()
      meta["epoch_train_seconds"] += now - segment_start
      if meta["epoch_paused_seconds"] is not None:
        meta["epoch_paused_seconds"] += paused - segment_paused
      segment_start, segment_paused = now, paused
      meta["epoch_totals"] = totals
      if step_in_epoch == steps_per_epoch:
        break
      saved = save(epoch - 1, step_in_epoch, state, carry)
      if signals.received is not None:
        raise _interrupted(signals.received, saved, checkpoints)
  finally:
    reporter.end_epoch()
  return state, carry
