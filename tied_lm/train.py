"""Training state, the pmapped train step, evaluation and the epoch loop.

`train_and_evaluate(config, workdir)` is the entry point. Running it again on
the same workdir resumes from the last checkpoint.
"""

import functools
import json
import math
import time
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax.training import train_state
from jax import lax

from tied_lm import data, losses, models
from tied_lm.errors import UserError
from tied_lm.fileio import atomic_write

AXIS = "batch"


class ConfigError(UserError):
  """A config value that cannot work."""


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises ConfigError on the first value that cannot work, before any work.

  Args:
    num_devices: the global device count the batch is split over.
  """
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
      (config.batch_size % num_devices == 0,
       f"batch_size={config.batch_size} is not divisible by the {num_devices} devices"),
      (config.model.init_scale > 0, f"model.init_scale={config.model.init_scale} must be > 0"),
      (config.loss.tau > 0, f"loss.tau={config.loss.tau} must be > 0"),
      (config.loss.gamma >= 0, f"loss.gamma={config.loss.gamma} must be >= 0"),
      (config.optim.learning_rate > 0,
       f"optim.learning_rate={config.optim.learning_rate} must be > 0"),
      (0 < config.optim.decay_rate <= 1,
       f"optim.decay_rate={config.optim.decay_rate} must be in (0, 1]"),
      (config.optim.clip_norm > 0, f"optim.clip_norm={config.optim.clip_norm} must be > 0"),
  ]
  for name in ("input_dropout", "hidden_dropout", "output_dropout"):
    rate = config.model[name]
    checks.append((0 <= rate < 1, f"model.{name}={rate} is a drop probability in [0, 1)"))
  m = config.model
  checks.append((
      not m.tie_embeddings or m.hidden_size == m.embed_dim or m.output_projection,
      f"tie_embeddings needs model.hidden_size == model.embed_dim (got {m.hidden_size} "
      f"!= {m.embed_dim}); set model.output_projection=True to add a projection",
  ))
  for ok, message in checks:
    if not ok:
      raise ConfigError(message)


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
    outputs: models.LMOutputs, targets: jax.Array, loss_config: ml_collections.ConfigDict
) -> tuple[jax.Array, jax.Array]:
  """Per-token cross-entropy and augmented KL, each [B, T] float32.

  The KL is zero when `loss_config.augmented` is off.
  """
  return losses.cross_entropy_and_kl(
      outputs.bias_free_logits,
      targets,
      outputs.embedding,
      loss_config.tau,
      output_bias=outputs.output_bias,
      augmented=loss_config.augmented,
      stop_gradient_target=loss_config.stop_gradient_target,
  )


def train_step(
    state: train_state.TrainState,
    carry: models.Carry,
    inputs: jax.Array,
    targets: jax.Array,
    dropout_key: jax.Array,
    *,
    loss_config: ml_collections.ConfigDict,
) -> tuple[train_state.TrainState, models.Carry, dict[str, jax.Array]]:
  """One SGD step on this device's rows; run under `jax.pmap(axis_name=AXIS)`.

  The objective is sum_t [CE + gamma * tau * KL], averaged over the rows.
  Gradients are averaged over devices before clipping, so N devices give the
  same update as one device on the whole batch.

  Args:
    carry: per-layer (c, h), each [b, H] for this device's b rows.
    inputs, targets: [b, T] word ids.
    dropout_key: the same on every device; folded with the step and device.

  Returns:
    the new state, the new carry and replicated metrics: sums of the
    cross-entropy and the KL over all devices' tokens, the token count and
    the gradient's global norm before clipping.
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
    cross_entropy, kl = loss_terms(outputs, targets, loss_config)
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
  return state.apply_gradients(grads=grads), new_carry, metrics


def pmap_train_step(
    loss_config: ml_collections.ConfigDict, devices: list[jax.Device] | None = None
) -> Any:
  """`train_step` pmapped over `devices` (default: all local ones).

  State and carry are donated; the dropout key is broadcast; metrics come
  back replicated (out_axes=None), so reading them needs no per-device index.
  """
  return jax.pmap(
      functools.partial(train_step, loss_config=loss_config),
      axis_name=AXIS,
      in_axes=(0, 0, 0, 0, None),
      donate_argnums=(0, 1),
      out_axes=(0, 0, None),
      devices=devices,
  )


@functools.partial(jax.jit, static_argnames="model", donate_argnums=1)
def eval_step(
    params: Any,
    carry: models.Carry,
    inputs: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    model: models.LSTMLanguageModel,
) -> tuple[models.Carry, jax.Array]:
  """One window: (new carry, weighted NLL sum). inputs/targets/weights: [B, T]."""
  logits, carry = model.apply({"params": params}, inputs, carry, deterministic=True)
  return carry, jnp.sum(losses.cross_entropy(logits, targets) * weights)


def evaluate(
    model: models.LSTMLanguageModel, params: Any, ids: np.ndarray, batch_size: int, num_steps: int
) -> tuple[float, int]:
  """Perplexity over every target token of `ids`, carrying state between windows.

  Returns:
    (perplexity, number of target tokens scored), the latter exactly len(ids) - 1.
  """
  inputs, targets, weights = data.eval_windows(ids, batch_size, num_steps)
  # The forward-only loop is unrolled in full: same numbers, and on a CPU the
  # per-iteration cost of 2 * num_steps tiny steps dominates evaluation.
  model = model.clone(unroll=num_steps)
  carry = model.initial_carry(batch_size)
  nll_sum = jnp.zeros((), jnp.float32)
  for window in range(len(inputs)):
    carry, window_nll = eval_step(
        params, carry, inputs[window], targets[window], weights[window], model=model
    )
    nll_sum += window_nll
  tokens_scored = int(weights.sum())
  return math.exp(float(nll_sum) / tokens_scored), tokens_scored


def first_replica(tree: Any) -> Any:
  """The copy on this process's first device of a pmap-replicated tree."""
  return jax.tree.map(lambda x: x.addressable_shards[0].data.reshape(x.shape[1:]), tree)


def to_numpy(tree: Any) -> Any:
  return jax.tree.map(np.asarray, tree)


def count_params(params: Any) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


class Checkpoints:
  """Epoch checkpoints of the train state, the best params and the history."""

  def __init__(self, directory: Path):
    self._manager = ocp.CheckpointManager(
        directory.resolve(), options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
    )

  def latest_epoch(self) -> int | None:
    return self._manager.latest_step()

  def save(self, epoch: int, arrays: dict[str, Any], meta: dict[str, Any]) -> None:
    self._manager.save(
        epoch,
        args=ocp.args.Composite(
            arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)
        ),
    )
    self._manager.wait_until_finished()

  def restore(self, epoch: int, arrays_like: dict[str, Any]) -> tuple[dict[str, Any], dict]:
    restored = self._manager.restore(
        epoch,
        args=ocp.args.Composite(
            arrays=ocp.args.StandardRestore(arrays_like), meta=ocp.args.JsonRestore()
        ),
    )
    return restored["arrays"], restored["meta"]


def train_epoch(
    p_train_step: Any,
    state: train_state.TrainState,
    carry: models.Carry,
    device_inputs: np.ndarray,
    device_targets: np.ndarray,
    dropout_key: jax.Array,
    *,
    log_every_steps: int,
    log_prefix: str,
) -> tuple[train_state.TrainState, dict[str, float]]:
  """Runs the pmapped step over every window, logging progress.

  Args:
    p_train_step: `train_step` under `jax.pmap`, metrics replicated out.
    state, carry: replicated over the local devices.
    device_inputs, device_targets: [steps, local devices, rows, T] windows.

  Returns:
    the new state and the epoch's summed cross-entropy, KL and token count.
  """
  num_steps = len(device_inputs)
  totals = {"cross_entropy_sum": 0.0, "kl_sum": 0.0, "num_tokens": 0.0}
  pending_metrics = []
  start = time.time()
  for step in range(num_steps):
    state, carry, metrics = p_train_step(
        state, carry, device_inputs[step], device_targets[step], dropout_key
    )
    # At most two steps in flight: one queued step keeps the device busy, and
    # XLA:CPU's all-reduce deadlocks when many multi-device steps are queued
    # (jax 0.10.2, 2 host devices). This waits without copying to the host.
    if pending_metrics:
      jax.block_until_ready(pending_metrics[-1])
    pending_metrics.append(metrics)
    if (step + 1) % log_every_steps and step + 1 < num_steps:
      continue
    # The only host transfer: metrics stay on the device between log lines.
    window = {k: sum(float(m[k]) for m in jax.device_get(pending_metrics)) for k in totals}
    pending_metrics = []
    for k in totals:
      totals[k] += window[k]
    tokens_per_second = totals["num_tokens"] / (time.time() - start)
    eta = (num_steps - step - 1) * (totals["num_tokens"] / (step + 1)) / tokens_per_second
    logging.info(
        "%s step %d/%d | loss %.3f ppl %.2f kl %.4f | %.0f tok/s | eta %s",
        log_prefix, step + 1, num_steps,
        window["cross_entropy_sum"] / window["num_tokens"],
        math.exp(window["cross_entropy_sum"] / window["num_tokens"]),
        window["kl_sum"] / window["num_tokens"], tokens_per_second, _format_seconds(eta),
    )
  return state, totals


def _format_seconds(seconds: float) -> str:
  minutes, seconds = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains, evaluates every epoch, checkpoints, and tests the best params.

  Writes `workdir/metrics.jsonl` (one object per finished epoch) and
  `workdir/results.json`, and returns the results.
  """
  num_devices = jax.device_count()
  validate_config(config, num_devices)
  corpus = data.load_corpus(config.dataset, config.data_dir, config.max_vocab_size)
  inputs, targets = data.train_windows(corpus.train, config.batch_size, config.num_steps)
  workdir = Path(workdir).expanduser()
  workdir.mkdir(parents=True, exist_ok=True)
  device_inputs, device_targets = (
      data.device_windows(x, jax.process_index(), jax.process_count(), jax.local_device_count())
      for x in (inputs, targets)
  )
  steps_per_epoch = len(inputs)
  if config.max_steps_per_epoch:
    steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)

  model = make_model(config, corpus.vocab_size)
  state = create_train_state(config, model, steps_per_epoch)
  num_params = count_params(state.params)
  logging.info(
      "%s: vocab %d, %d train tokens, %d steps/epoch, %d params, %d devices",
      config.dataset, corpus.vocab_size, len(corpus.train), steps_per_epoch, num_params,
      num_devices,
  )

  checkpoints = Checkpoints(workdir / "checkpoints")
  arrays = {"state": to_numpy(state), "best_params": to_numpy(state.params)}
  meta = {"epoch": 0, "best_epoch": 0, "best_valid_perplexity": None, "history": []}
  last_epoch = checkpoints.latest_epoch()
  if last_epoch is not None:
    arrays, meta = checkpoints.restore(last_epoch, arrays)
    state = arrays["state"]
    logging.info("Resumed from the checkpoint of epoch %d in %s", last_epoch, workdir)

  p_train_step = pmap_train_step(config.loss)
  state = flax.jax_utils.replicate(state)
  dropout_key = jax.random.key(config.seed + 1)
  schedule = learning_rate_schedule(config.optim, steps_per_epoch)
  rows_per_device = device_inputs.shape[2]

  for epoch in range(meta["epoch"] + 1, config.num_epochs + 1):
    learning_rate = float(schedule((epoch - 1) * steps_per_epoch))
    epoch_start = time.time()
    state, totals = train_epoch(
        p_train_step, state, flax.jax_utils.replicate(model.initial_carry(rows_per_device)),
        device_inputs[:steps_per_epoch], device_targets[:steps_per_epoch], dropout_key,
        log_every_steps=config.log_every_steps, log_prefix=f"epoch {epoch} lr {learning_rate:.4g}",
    )
    train_seconds = time.time() - epoch_start
    train_perplexity = math.exp(totals["cross_entropy_sum"] / totals["num_tokens"])

    params = first_replica(state.params)
    valid_perplexity, valid_tokens = evaluate(
        model, params, corpus.valid, config.eval_batch_size, config.num_steps
    )
    if meta["best_valid_perplexity"] is None or valid_perplexity < meta["best_valid_perplexity"]:
      meta.update(best_epoch=epoch, best_valid_perplexity=valid_perplexity)
      arrays["best_params"] = to_numpy(params)
    meta["epoch"] = epoch
    epoch_seconds = time.time() - epoch_start
    previous_wall_seconds = meta["history"][-1]["wall_seconds"] if meta["history"] else 0.0
    meta["history"].append({
        "epoch": epoch,
        "learning_rate": learning_rate,
        "train_perplexity": train_perplexity,
        "train_kl": totals["kl_sum"] / totals["num_tokens"],
        "valid_perplexity": valid_perplexity,
        "valid_tokens_scored": valid_tokens,
        "train_tokens_per_second": totals["num_tokens"] / train_seconds,
        "epoch_seconds": epoch_seconds,
        "wall_seconds": previous_wall_seconds + epoch_seconds,
    })
    logging.info(
        "epoch %d done | train ppl %.2f | valid ppl %.2f (%d tokens) | best %.2f (epoch %d)",
        epoch, train_perplexity, valid_perplexity, valid_tokens,
        meta["best_valid_perplexity"], meta["best_epoch"],
    )
    arrays["state"] = to_numpy(first_replica(state))
    checkpoints.save(epoch, arrays, meta)
    if jax.process_index() == 0:
      atomic_write(
          workdir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in meta["history"])
      )

  best_params = arrays["best_params"]
  test_perplexity, test_tokens = evaluate(
      model, best_params, corpus.test, config.eval_batch_size, config.num_steps
  )
  history = meta["history"]
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
      "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__},
      "devices": [str(d) for d in jax.devices()],
      "config": config.to_dict(),
  }
  logging.info(
      "best valid ppl %.2f (epoch %d), test ppl %.2f over %d tokens (eval batch %d)",
      results["valid_perplexity"], results["best_epoch"], test_perplexity, test_tokens,
      config.eval_batch_size,
  )
  if jax.process_index() == 0:
    atomic_write(workdir / "results.json", json.dumps(results, indent=2) + "\n")
  return results
