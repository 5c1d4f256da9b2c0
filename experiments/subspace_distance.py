r"""Does W move towards Lᵀ? The paper's section-5 check, at small scale on a CPU.

  python -m experiments.subspace_distance --seeds=0,1,2 --num_epochs=6

Trains an untied 2-layer LSTM (no dropout, no output bias, rows of L kept at
norm 1) on the first --num_words tokens of PTB's training text, with its own
vocabulary (the words of the slice), under
J_tot = β·J_aug·τ²·|V| + (1−β)·J for each β and τ, and measures the normalized
subspace distance between the column spaces of L and W (`tied_lm.analysis`).
The paper reports about 1 at β = 0 and about 0.06 at β = 1, τ = 10, smaller
for larger τ. β = 0 does not depend on τ, so it is trained once per seed.

Writes JSON (every run's per-epoch J, J_aug and distance, with command,
commit, hardware and versions), a Markdown table (mean ± std over seeds) and
a PNG (needs matplotlib) under experiments/results/.
"""

import math
import time
from pathlib import Path

import numpy as np
from absl import app, flags, logging

from tied_lm import data, errors, provenance, summarize
from tied_lm.errors import UserError

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_list("betas", ["0", "0.25", "0.5", "0.75", "1"], "Weights β of J_aug.")
  flags.DEFINE_list("taus", ["2", "5", "10"], "Temperatures τ.")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Initialisation seeds.")
  flags.DEFINE_integer("num_words", 20000, "Tokens of PTB train to train on.")
  flags.DEFINE_integer("hidden_size", 300, "Units (= embedding size) of each layer.")
  flags.DEFINE_integer("batch_size", 20, "Rows of each training batch.")
  flags.DEFINE_integer("num_steps", 35, "Unroll of each training window.")
  flags.DEFINE_integer("num_epochs", 30, "Passes over the slice.")
  flags.DEFINE_float("learning_rate", 1.0, "SGD's learning rate (gradients clipped at norm 5).")
  flags.DEFINE_string("output", str(provenance.REPO / "experiments/results/subspace_distance"),
                      "Path prefix: PREFIX.json, PREFIX.md, PREFIX.png.")


def slice_ids(ids: np.ndarray, num_words: int, minimum: int) -> tuple[np.ndarray, int]:
  """The first num_words ids, renumbered 0..V-1 over the words they use; and V.

  `minimum` is the fewest that make one training batch (data.min_train_tokens).
  """
  if minimum > len(ids):  # no --num_words could do
    raise UserError(f"one batch of --batch_size rows of --num_steps + 1 words, {minimum:,} "
                    f"words, is more than PTB train's {len(ids):,}: lower --batch_size or "
                    "--num_steps")
  if not minimum <= num_words <= len(ids):
    raise UserError(f"--num_words={num_words} must be in [{minimum:,}, {len(ids):,}] (one "
                    "batch of --batch_size rows of --num_steps + 1 words; PTB train's length)")
  words = np.asarray(ids[:num_words])
  used, compact = np.unique(words, return_inverse=True)
  return compact.astype(np.int32), len(used)


def final_distances(results: dict, beta: float, tau: float) -> list[float]:
  """Each seed's last distance at (β, τ); β = 0 runs have no τ and count for every τ."""
  return [r["distance"][-1] for r in results["runs"]
          if r["beta"] == beta and (r["tau"] == tau or beta == 0)]


def table(results: dict) -> str:
  """Markdown: rows β, columns τ, cells mean ± std of the final distance over seeds."""
  taus = results["taus"]
  lines = ["| β | " + " | ".join(f"τ = {t:g}" for t in taus) + " |",
           "|---|" + "---|" * len(taus)]
  for beta in results["betas"]:
    cells = []
    for tau in taus:
      finals = final_distances(results, beta, tau)
      cells.append(f"{np.mean(finals):.3f} ± {np.std(finals):.3f}")
    lines.append(f"| {beta:g} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
  """Final distance against β, one line per τ, with each seed's point."""
  plt = summarize.pyplot()
  figure, axes = plt.subplots(figsize=(6.4, 4.0))
  for tau in results["taus"]:
    betas, means, points = [], [], []
    for beta in results["betas"]:
      finals = final_distances(results, beta, tau)
      betas.append(beta)
      means.append(np.mean(finals))
      points += [(beta, f) for f in finals]
    line, = axes.plot(betas, means, marker="o", label=f"τ = {tau:g}")
    axes.scatter(*zip(*points, strict=True), color=line.get_color(), alpha=0.4, s=12)
  axes.set_xlabel("β (weight of J_aug·τ²·|V|)")
  axes.set_ylabel("normalized subspace distance(L, W)")
  axes.set_ylim(0, 1.05)
  axes.set_title(f"W vs Lᵀ after {results['num_epochs']} epochs, "
                 f"{len(results['seeds'])} seeds (points)")
  axes.grid(True, alpha=0.3)
  axes.legend()
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


@errors.command
def main(argv: list[str]) -> None:
  errors.no_positional_arguments(argv)
  try:
    betas = [float(b) for b in FLAGS.betas]
    taus = [float(t) for t in FLAGS.taus]
    seeds = [int(s) for s in FLAGS.seeds]
  except ValueError as error:
    raise UserError(f"--betas, --taus and --seeds take numbers: {error}") from None
  if any(not 0 <= b <= 1 for b in betas):
    raise UserError(f"every β must be in [0, 1]: {', '.join(FLAGS.betas)}")
  from tied_lm import losses  # JAX: after the flags, so that --help answers without it

  if not all(map(losses.is_temperature, taus)):
    low, high = losses.TEMPERATURE_RANGE
    raise UserError(f"every τ must be in [{low:.3g}, {high:.3g}] (float32's positive normal "
                    f"numbers): {', '.join(FLAGS.taus)}")
  if not (betas and taus and seeds) or FLAGS.num_epochs < 1:
    raise UserError("--betas, --taus and --seeds need a value each, and --num_epochs >= 1")
  for name, values in (("betas", betas), ("taus", taus), ("seeds", seeds)):
    if len(set(values)) < len(values):  # a repeated seed would count twice in mean ± std
      raise UserError(f"--{name} repeats a value: {', '.join(FLAGS[name].value)}")
  if any(not 0 <= seed < 2**32 for seed in seeds):
    raise UserError(f"every seed must be in [0, 2**32): {', '.join(FLAGS.seeds)}")
  if not (math.isfinite(FLAGS.learning_rate) and FLAGS.learning_rate > 0):
    raise UserError(f"--learning_rate={FLAGS.learning_rate} must be finite and > 0")
  for name in ("hidden_size", "batch_size", "num_steps"):
    if FLAGS[name].value < 1:
      raise UserError(f"--{name}={FLAGS[name].value} must be at least 1")
  # Also refuses a folder named PREFIX.png; the folder of PREFIX is made by the JSON's write.
  prefix = provenance.output_prefix(FLAGS.output)
  summarize.pyplot()  # matplotlib missing: say so now, not after the sweep
  # Imported here, not at the top: --help and flag errors then answer without JAX (about 4 s).
  from tied_lm import analysis

  corpus = data.load_corpus("ptb")
  ids, vocab_size = slice_ids(corpus.train, FLAGS.num_words,
                             data.min_train_tokens(FLAGS.batch_size, FLAGS.num_steps))
  start = time.time()
  commit = provenance.git_commit()  # what runs, whatever HEAD is at the end
  runs = []
  for seed in seeds:
    for beta in betas:
      for tau in taus[:1] if beta == 0 else taus:
        run_start = time.time()
        run = analysis.train_theory_model(
            ids, vocab_size, tau=tau, beta=beta, seed=seed, hidden_size=FLAGS.hidden_size,
            batch_size=FLAGS.batch_size, num_steps=FLAGS.num_steps,
            num_epochs=FLAGS.num_epochs, learning_rate=FLAGS.learning_rate)
        runs.append({"beta": beta, "tau": None if beta == 0 else tau, "seed": seed,
                     "cross_entropy": run.cross_entropy, "kl": run.kl,
                     "distance": run.distance, "seconds": time.time() - run_start})
        logging.info("seed %d β %g τ %g: distance %.3f, J %.3f, J_aug %.2e (%.0f s)",
                     seed, beta, tau, run.distance[-1], run.cross_entropy[-1], run.kl[-1],
                     time.time() - run_start)
  results = {
      **provenance.header("experiments.subspace_distance", commit),
      "num_words": FLAGS.num_words,
      "vocab_size": vocab_size, "hidden_size": FLAGS.hidden_size,
      "batch_size": FLAGS.batch_size, "num_steps": FLAGS.num_steps,
      "num_epochs": FLAGS.num_epochs, "learning_rate": FLAGS.learning_rate,
      "betas": betas, "taus": taus, "seeds": seeds, "runs": runs,
      "wall_seconds": time.time() - start,
  }
  markdown = table(results)
  provenance.write_results(prefix, results, (
      f"Normalized subspace distance between the column spaces of L and W, mean ± std over "
      f"seeds {seeds}, after {FLAGS.num_epochs} epochs on the first {FLAGS.num_words:,} "
      f"words of PTB train ({vocab_size:,}-word vocabulary), {FLAGS.hidden_size} units.\n"
      f"Command: `{results['command']}`, commit `{results['commit'][:7]}`, "
      f"{results['hardware']['cpu']}, {results['wall_seconds']:.0f} s.\n\n{markdown}\n"))
  print(markdown)
  plot(results, provenance.with_extension(prefix, ".png"))
  print(f"wrote {prefix}.json, .md and .png")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=errors.parse_flags)
