r"""Times the blocks of one train step, ours beside PyTorch's: where does the time go?

  python -m experiments.profile_step --configs=configs/ptb.py:medium,real --compare=torch

Each block is a forward and backward pass on fixed inputs, jitted for ours:
  lstm    embedding lookup, dropout masks and the LSTM stack -> h [B, T, H],
          then the gradient of <h, R> (R fixed) w.r.t. all parameters;
  output  fixed h -> [projection] -> logits -> sum_t [CE + γτ KL] / B, the
          gradient w.r.t. h and the output parameters (embedding, bias...);
  update  clipping to the global norm and the SGD update of every parameter,
          from a fixed gradient (ours: `TrainState.apply_gradients` jitted
          alone with the state donated, as in the step; torch:
          `clip_grad_norm_` and `SGD.step`); no matmuls, so no share of the
          peak. Inside our step XLA may fuse part of it into the backward
          pass, so this is an upper bound of its cost there;
  step    the whole train step, exactly as `experiments.benchmark` times it
          (plus clipping, the SGD update and the feeding of batches);
  matmuls the step's matmuls alone (`benchmark.step_matmuls`: same shapes, on
          random operands, the per-time-step ones chained as in a recurrence),
          so each library's matmul speed on these shapes, and the share of
          the peak that the step could reach if nothing else took time.
and the forward-only eval step, at --eval_batch_size, split the same way:
  eval_lstm    the embedding and LSTM stack without dropout (ours unrolled in
               full, as `train.evaluate` runs it; torch under no_grad);
  eval_output  fixed h -> [projection] -> logits -> summed cross-entropy;
  eval         a window of the eval step, exactly as the benchmark times it.
With --compare=torch the torch blocks run the same computation through
`experiments/torch_reference.py` on the same parameters, and repeats alternate
ours and torch, as in the benchmark, whose flags this module shares (--configs,
--set, --batch_sizes, --compare, --fp32_matmuls, --repeats, --steps_per_repeat,
--warmup, --matmul_size, --output). It prints the median ms per call, the ratio
torch/ours (> 1: ours is faster) and each block's share of the matmul peak
(the best of samples taken before each row and at the end, as in the
benchmark), and writes them as JSON (default
experiments/results/profile_<platform>.json). It times one device: the
benchmark's --num_devices is refused.
"""

import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, logging

from experiments import benchmark
from tied_lm import data, errors, hostmem, models, provenance, train
from tied_lm.errors import UserError

FLAGS = benchmark.FLAGS
BLOCKS = ("lstm", "output", "update", "step", "matmuls", "eval_lstm", "eval_output", "eval")


class Calls:
  """A benchmark runner that calls `fn` n times, then waits for the last result."""

  def __init__(self, fn: Callable[[], Any], sync: Callable[[Any], Any]):
    self.fn, self.sync = fn, sync

  def run(self, num_steps: int) -> None:
    for _ in range(num_steps):
      result = self.fn()
    self.sync(result)


def our_blocks(config: ml_collections.ConfigDict, model: models.LSTMLanguageModel, params: Any,
               inputs: np.ndarray, targets: np.ndarray, max_distinct_targets: int = 0) -> dict:
  """Runners for our lstm and output blocks on one window [B, T]."""
  batch_size = inputs.shape[0]
  carry = model.initial_carry(batch_size)
  alpha = config.loss.gamma * config.loss.tau
  key = jax.random.key(0)
  hidden_shape = (batch_size, config.num_steps, config.model.hidden_size)
  cotangent = jax.random.normal(key, hidden_shape)

  def hidden_states(params, key):
    masks = model.apply({"params": params}, batch_size, deterministic=False,
                        rngs={"dropout": key}, method=model.dropout_masks)
    return model.apply({"params": params}, inputs, carry, masks, method=model.hidden_states)[0]

  @jax.jit
  def lstm(params, key):
    return jax.grad(lambda p: jnp.vdot(hidden_states(p, key), cotangent))(params)

  output_params = {k: v for k, v in params.items() if not k.startswith("lstm_")}

  @jax.jit
  def output(output_params, hidden):
    def objective(output_params, hidden):
      outputs = model.apply(
          {"params": {**params, **output_params}}, hidden, carry, method=model.output_terms
      )
      cross_entropy, kl = train.loss_terms(outputs, targets, config.loss, max_distinct_targets)
      return jnp.sum(cross_entropy + alpha * kl) / batch_size

    return jax.grad(objective, argnums=(0, 1))(output_params, hidden)

  hidden = hidden_states(params, key)
  sync = jax.block_until_ready
  return {"lstm": Calls(lambda: lstm(params, key), sync),
          "output": Calls(lambda: output(output_params, hidden), sync)}


def our_eval_blocks(
    model: models.LSTMLanguageModel, params: Any, inputs: np.ndarray, targets: np.ndarray
) -> dict:
  """Runners for the two halves of our eval step on one window [B, T]."""
  batch_size, num_steps = inputs.shape
  model = model.for_evaluation(num_steps)  # as train.evaluate
  carry = model.initial_carry(batch_size)
  weights = jnp.ones(inputs.shape, jnp.float32)

  @jax.jit
  def lstm(params):
    masks = model.apply({"params": params}, batch_size, deterministic=True,
                        method=model.dropout_masks)
    return model.apply({"params": params}, inputs, carry, masks, method=model.hidden_states)[0]

  @jax.jit
  def output(params, hidden):
    outputs = model.apply({"params": params}, hidden, carry, method=model.output_terms)
    return train.window_nll(outputs, targets, weights)

  hidden = lstm(params)
  sync = jax.block_until_ready
  return {"eval_lstm": Calls(lambda: lstm(params), sync),
          "eval_output": Calls(lambda: output(params, hidden), sync)}


class OurUpdate:
  """Runs our clip-and-SGD update on a fixed gradient, the state donated and carried."""

  def __init__(
      self, config: ml_collections.ConfigDict, model: models.LSTMLanguageModel,
      steps_per_epoch: int,
  ):
    self.state = train.create_train_state(config, model, steps_per_epoch)
    self.grads = jax.tree.map(
        lambda p: jax.random.normal(jax.random.key(0), p.shape, p.dtype), self.state.params)
    self.apply = jax.jit(lambda state, grads: state.apply_gradients(grads=grads),
                         donate_argnums=0)

  def run(self, num_steps: int) -> None:
    for _ in range(num_steps):
      self.state = self.apply(self.state, self.grads)
    jax.block_until_ready(self.state)


def _next_input(y, width: int, repeat: Callable[[Any, int], Any]):
  """A recurrent product's output y [m, n] as the next input [m, width]: its first
  `width` columns, or y repeated `repeat(y, times)` along columns when narrower."""
  return (repeat(y, width // y.shape[1]) if y.shape[1] < width else y)[:, :width]


def matmul_operands(matmuls: list[benchmark.Matmul]) -> list[tuple[np.ndarray, np.ndarray]]:
  """Random fp32 operands for each product, distinct so that no two can be merged."""
  rng = np.random.default_rng(0)
  return [(rng.standard_normal((mm.m, mm.k), np.float32),
           rng.standard_normal((mm.k, mm.n), np.float32)) for mm in matmuls]


def our_matmuls(
    matmuls: list[benchmark.Matmul], operands: list[tuple[np.ndarray, np.ndarray]]
) -> Calls:
  """One jitted call that runs every product of the step."""
  counts = [mm.count for mm in matmuls]

  @jax.jit
  def run(operands):
    results = []
    for count, (x, w) in zip(counts, operands, strict=True):
      if count == 1:
        results.append(x @ w)
      else:
        def step(x, _, w=w):
          return _next_input(x @ w, w.shape[0], lambda y, n: jnp.tile(y, (1, n))), None

        results.append(jax.lax.scan(step, x, length=count)[0])
    return results

  device_operands = jax.device_put(operands)
  return Calls(lambda: run(device_operands), jax.block_until_ready)


def torch_sync(device: str) -> Callable[[Any], None]:
  """A `Calls` sync for torch on `device`: waits for CUDA's queue, nothing on a CPU."""
  import torch

  def sync(_: Any) -> None:
    if device == "cuda":
      torch.cuda.synchronize()

  return sync


def torch_blocks(
    config: ml_collections.ConfigDict, model: Any, inputs: np.ndarray, targets: np.ndarray,
    device: str,
) -> dict:
  """Runners for the same two blocks through the PyTorch reference."""
  import torch

  from experiments import torch_reference

  batch_size = inputs.shape[0]
  tokens = torch.from_numpy(inputs).long().to(device)
  target_ids = torch.from_numpy(targets).long().to(device)
  state = model.initial_state(batch_size)
  alpha = config.loss.gamma * config.loss.tau
  hidden_shape = (batch_size, config.num_steps, config.model.hidden_size)
  cotangent = torch.randn(hidden_shape, device=device)
  fixed_hidden = torch.randn(hidden_shape, device=device)
  model.train()

  def lstm():
    model.train()  # the eval blocks switch it off
    model.zero_grad(set_to_none=True)
    hidden, _ = model.hidden_states(tokens, state)
    (hidden * cotangent).sum().backward()

  # Copies, so that the update block leaves the model the other blocks run unchanged.
  parameters = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
  for parameter in parameters:
    parameter.grad = torch.randn_like(parameter)
  optimizer = torch.optim.SGD(parameters, lr=config.optim.learning_rate)

  def update():
    torch.nn.utils.clip_grad_norm_(parameters, config.optim.clip_norm)
    optimizer.step()

  def output():
    model.train()
    model.zero_grad(set_to_none=True)
    logits, bias_free_logits = model.output_logits(fixed_hidden.detach().requires_grad_())
    cross_entropy, kl = torch_reference.loss_terms(
        logits, bias_free_logits, target_ids, model.embed.weight, config.loss,
    )
    ((cross_entropy + alpha * kl).sum() / batch_size).backward()

  sync = torch_sync(device)

  return {"lstm": Calls(lstm, sync), "output": Calls(output, sync),
          "update": Calls(update, sync)}


def torch_eval_blocks(
    model: Any, inputs: np.ndarray, targets: np.ndarray, device: str
) -> dict:
  """Runners for the two halves of the eval step through the PyTorch reference."""
  import torch
  import torch.nn.functional as F

  tokens = torch.from_numpy(inputs).long().to(device)
  target_ids = torch.from_numpy(targets).long().to(device).reshape(-1)
  state = model.initial_state(inputs.shape[0])

  @torch.no_grad()
  def lstm():
    model.eval()
    return model.hidden_states(tokens, state)[0]

  hidden = lstm()

  @torch.no_grad()
  def output():
    model.eval()
    logits, _ = model.output_logits(hidden)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target_ids, reduction="sum")

  sync = torch_sync(device)

  return {"eval_lstm": Calls(lstm, sync), "eval_output": Calls(output, sync)}


def torch_matmuls(
    matmuls: list[benchmark.Matmul], operands: list[tuple[np.ndarray, np.ndarray]], device: str
) -> Calls:
  """The same products through torch, one call after another."""
  import torch

  device_operands = [
      (torch.from_numpy(x).to(device), torch.from_numpy(w).to(device)) for x, w in operands
  ]

  @torch.no_grad()
  def run():
    for mm, (x, w) in zip(matmuls, device_operands, strict=True):
      for _ in range(mm.count):
        x = _next_input(x @ w, mm.k, lambda y, n: y.repeat(1, n)) if mm.count > 1 else x @ w
    return x

  sync = torch_sync(device)

  return Calls(run, sync)


def profile_config(
    spec: str, config: ml_collections.ConfigDict, batch_size: int, torch_device: str
) -> dict:
  """One config's row: per block, our ms per call and FLOPs, and torch's ms and the
  ratio if compared (`set_peak_fractions` adds the share of the peak)."""
  corpus = data.load_corpus(config.dataset, config.data_dir, config.max_vocab_size)
  ours_step = benchmark.OurTrainer(config, corpus, batch_size, 1)
  flops = benchmark.step_flops(config, corpus.vocab_size, batch_size, FLAGS.eval_batch_size,
                               ours_step.target_rows)
  inputs, targets = (x[0] for x in data.train_windows(corpus.train, batch_size, config.num_steps))
  matmuls = benchmark.step_matmuls(config, corpus.vocab_size, batch_size, ours_step.target_rows)
  operands = matmul_operands(matmuls)
  eval_batch_size = FLAGS.eval_batch_size
  eval_inputs, eval_targets, _ = (
      x[0] for x in data.eval_windows(corpus.valid, eval_batch_size, config.num_steps))
  ours = {**our_blocks(config, ours_step.model, ours_step.params, inputs, targets,
                       ours_step.max_distinct_targets),
          "update": OurUpdate(config, ours_step.model, ours_step.inputs.shape[0]),
          "step": ours_step, "matmuls": our_matmuls(matmuls, operands),
          **our_eval_blocks(ours_step.model, ours_step.params, eval_inputs, eval_targets),
          "eval": benchmark.OurEvaluator(ours_step.model, ours_step.params, corpus.valid,
                                         eval_batch_size, config.num_steps)}
  theirs = dict.fromkeys(BLOCKS)
  if FLAGS.compare == "torch":
    torch_step = benchmark.TorchTrainer(
        config, corpus, batch_size, torch_device, ours_step.params
    )
    theirs = {**torch_blocks(config, torch_step.model, inputs, targets, torch_device),
              "step": torch_step, "matmuls": torch_matmuls(matmuls, operands, torch_device),
              **torch_eval_blocks(torch_step.model, eval_inputs, eval_targets, torch_device),
              "eval": benchmark.TorchEvaluator(torch_step, corpus.valid, eval_batch_size,
                                               config.num_steps)}
  block_flops = {"lstm": flops["train_lstm"], "output": flops["train_output"], "update": 0,
                 "step": flops["train"], "matmuls": flops["train"],
                 "eval_lstm": flops["eval_lstm"], "eval_output": flops["eval_output"],
                 "eval": flops["eval"]}
  row = {"config": spec, "overrides": FLAGS.set, "batch_size": batch_size,
         "eval_batch_size": eval_batch_size,
         "num_steps": config.num_steps, "matmuls": [mm._asdict() for mm in matmuls],
         "blocks": {}}
  for block in BLOCKS:
    rows_per_call = eval_batch_size if block.startswith("eval") else batch_size
    our_stats, torch_stats = benchmark.benchmark_pair(
        ours[block], theirs[block], rows_per_call * config.num_steps
    )
    stats = row["blocks"][block] = {
        "ms": our_stats["step_ms"], "flops": block_flops[block],
        "repeat_seconds": our_stats["repeat_seconds"],
    }
    if torch_stats is not None:
      stats.update({
          "torch_ms": torch_stats["step_ms"],
          "ratio_vs_torch": torch_stats["step_ms"] / our_stats["step_ms"],
          "ratio_vs_torch_range": benchmark.paired_ratio_range(our_stats, torch_stats),
          "torch_repeat_seconds": torch_stats["repeat_seconds"],
      })
  return row


def set_peak_fractions(rows: list[dict], peak: float) -> None:
  """Each block's achieved matmul FLOP/s as a share of `peak` (FLOP/s)."""
  for row in rows:
    row["matmul_peak_flops"] = peak
    for stats in row["blocks"].values():
      stats["peak_fraction"] = stats["flops"] / (stats["ms"] / 1e3) / peak


def print_row(row: dict) -> None:
  print(f"{row['config']} batch {row['batch_size']}, eval batch {row['eval_batch_size']}")
  print(f"  {'block':<11} {'ours ms':>8} {'torch ms':>8} {'ratio':>5} {'range':>11} {'%peak':>5}")
  for block, stats in row["blocks"].items():
    if "torch_ms" in stats:
      low, high = stats["ratio_vs_torch_range"]
      torch_columns = (f"{stats['torch_ms']:>8.1f} {stats['ratio_vs_torch']:>5.2f} "
                       f"{low:>5.2f}-{high:<5.2f}")
    else:
      torch_columns = f"{'-':>8} {'-':>5} {'-':>11}"
    share = f"{100 * stats['peak_fraction']:>5.1f}" if stats["flops"] else f"{'-':>5}"
    print(f"  {block:<11} {stats['ms']:>8.1f} {torch_columns} {share}")


@errors.command
def main(argv: list[str]) -> None:
  errors.no_positional_arguments(argv)
  if FLAGS.num_devices != ["1"]:
    raise UserError("profile_step times one device; --num_devices is the benchmark's flag")
  run_profile()


def run_profile() -> None:
  start = time.time()
  host_malloc = hostmem.reuse_freed_memory()  # before the first computation
  plan = benchmark.timed_configs([1])
  commit = provenance.git_commit()
  platform_name = jax.local_devices()[0].platform
  torch_device = "cuda" if platform_name == "gpu" else "cpu"
  versions = benchmark.library_versions()
  output = benchmark.output_path(f"profile_{platform_name}.json")
  rows, peak_samples = [], []

  def sample_peak() -> None:
    peak_samples.append(benchmark.measure_matmul_peak(FLAGS.matmul_size))
    logging.info("fp32 matmul peak: %.0f GFLOP/s", peak_samples[-1] / 1e9)

  def write(complete: bool) -> None:
    # As in the benchmark: the best sample so far, since this machine's speed
    # drifts within a run and one slow sample would inflate every share.
    set_peak_fractions(rows, max(peak_samples))
    provenance.write_json(output, {
        **provenance.header("experiments.profile_step", commit, versions),
        "fp32_matmuls": FLAGS.fp32_matmuls, "host_malloc": host_malloc,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "matmul_peak_samples": peak_samples, "rows": rows, "complete": complete,
        "wall_seconds": time.time() - start,
    })

  for spec, config, batch_sizes in plan:
    for batch_size in batch_sizes:
      if FLAGS.compare == "torch":
        import torch

        torch.manual_seed(0)
      sample_peak()
      rows.append(profile_config(spec, config, batch_size, torch_device))
      write(complete=False)
      print_row(rows[-1])
  sample_peak()
  write(complete=True)
  print(f"fp32 matmul peak: {max(peak_samples) / 1e9:.0f} GFLOP/s (best of "
        f"{len(peak_samples)} samples)")
  for row in rows:
    print_row(row)
  print(f"wrote {output}")


if __name__ == "__main__":
  app.run(main, flags_parser=errors.parse_flags)
