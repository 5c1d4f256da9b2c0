r"""How much does the augmented loss's target say? ỹ's sharpness in trained runs.

  python -m experiments.target_sharpness --workdirs=/tmp/runs/ptb_small_al \
      --taus=1,2,5,10,20

For each run's best checkpoint and each τ, the mean over the validation text's
tokens y of the entropy of ỹ = softmax(L[y] Lᵀ / τ) and of ỹ's probability of y
itself, beside the mean |L[y]|² and, for an untied run, the subspace distance
between L and the output classifier W (`analysis.subspace_distance`; the
paper's section 4: the KL pulls W towards L). A ỹ near uniform (entropy near
log V) carries no word similarity for the KL to teach. Writes PREFIX.json (with
command, commit, hardware and versions) and PREFIX.md.
"""

import math
import time
from typing import TYPE_CHECKING

import numpy as np
from absl import app, flags

from tied_lm import errors, provenance
from tied_lm.errors import UserError

if TYPE_CHECKING:  # imports JAX: --help and flag errors answer without it
  from tied_lm import train

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_list("workdirs", None, "Run directories of tied_lm.main.")
  flags.DEFINE_list("taus", ["1", "2", "5", "10", "20"], "Temperatures τ.")
  flags.DEFINE_string("output", str(provenance.REPO / "experiments/results/target_sharpness"),
                      "Path prefix: PREFIX.json, PREFIX.md.")
  errors.require_values("workdirs", "taus")
  errors.require_distinct_folders("workdirs")


def run_rows(workdir: str, run: "train.TrainedRun", taus: list[float]) -> list[dict]:
  """One row per τ for the run loaded from `workdir`, on its validation text."""
  # Imported here, not at the top: --help and flag errors then answer without JAX (about 4 s).
  from tied_lm import analysis

  embedding = np.asarray(run.params["embed"]["embedding"], np.float32)
  targets = np.asarray(run.corpus.valid)
  mean_squared_norm = float(np.mean(np.sum(embedding[targets] ** 2, axis=-1)))
  distance = (None if run.config.model.tie_embeddings  # W = Lᵀ: distance 0
              else analysis.subspace_distance(embedding, analysis.output_matrix(run.params)))
  common = {"workdir": workdir, "config_tau": run.config.loss.tau, "step": run.checkpoint_step,
            "vocab_size": run.corpus.vocab_size, "tokens": len(targets),
            "mean_squared_norm": mean_squared_norm, "embedding_classifier_distance": distance}
  return [{**common, "tau": tau, **analysis.target_sharpness(embedding, targets, tau)._asdict()}
          for tau in taus]


def table(rows: list[dict]) -> str:
  lines = ["| run | step | mean \\|L[y]\\|² | d(L, W) | τ | entropy of ỹ (nats) | ỹ(y) |",
           "|---|---|---|---|---|---|---|"]
  for row in rows:
    distance = row["embedding_classifier_distance"]
    lines.append(f"| {row['workdir']} | {row['step']} | {row['mean_squared_norm']:.2f} | "
                 f"{'tied' if distance is None else f'{distance:.3f}'} | "
                 f"{row['tau']:g} | {row['entropy']:.3f} of {math.log(row['vocab_size']):.3f} | "
                 f"{row['target_probability']:.4f} |")
  return "\n".join(lines) + "\n"


@errors.command
def main(argv: list[str]) -> None:
  errors.no_positional_arguments(argv)
  start = time.time()
  commit = provenance.git_commit()
  try:
    taus = [float(t) for t in FLAGS.taus]
  except ValueError as error:
    raise UserError(f"--taus: {error}") from None
  if len(set(taus)) < len(taus):  # each run's rows would repeat, as subspace_distance refuses
    raise UserError(f"--taus repeats a value: {', '.join(FLAGS.taus)}")
  from tied_lm import losses  # JAX: after the flags, so that --help answers without it

  if not all(map(losses.is_temperature, taus)):
    low, high = losses.TEMPERATURE_RANGE
    raise UserError(f"--taus={','.join(FLAGS.taus)}: every τ must be in [{low:.3g}, "
                    f"{high:.3g}] (float32's positive normal numbers)")
  prefix = provenance.output_prefix(FLAGS.output)  # before the runs are scored
  from tied_lm import train

  # Every run loaded before any is measured: a bad last workdir is refused at once.
  loaded = [train.load_trained(workdir) for workdir in FLAGS.workdirs]
  rows = [row for workdir, run in zip(FLAGS.workdirs, loaded, strict=True)
          for row in run_rows(workdir, run, taus)]
  markdown = table(rows)
  provenance.write_results(prefix, {
      **provenance.header("experiments.target_sharpness", commit), "rows": rows,
      "wall_seconds": time.time() - start}, markdown)
  print(markdown, end="")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=errors.parse_flags)
