"""Perplexity of a run's best parameters: python -m tied_lm.evaluate --workdir=DIR.

  python -m tied_lm.evaluate --workdir=/tmp/ptb_small_real --split=test --eval_batch_size=1

Prints the perplexity and the number of target tokens scored, and writes them
to DIR/eval_SPLIT_batchB.json with the command, commit, hardware and library
versions. Batch 1 conditions every token on its whole history; larger batches
start each row from a zero state (faster).
"""

from pathlib import Path

from absl import app, flags

from tied_lm import errors, hostmem, provenance
from tied_lm.errors import UserError

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags; defined only when it runs, so that the module imports cleanly."""
  flags.DEFINE_string("workdir", None, "A run directory of tied_lm.main.")
  flags.DEFINE_enum("split", "test", ["train", "valid", "test"], "Which split to score.")
  flags.DEFINE_integer("eval_batch_size", None, "Rows scored in parallel (default: the run's).",
                       lower_bound=1)
  errors.require_name("workdir", "a run directory of tied_lm.main")


@errors.command
def main(argv: list[str]) -> None:
  errors.no_positional_arguments(argv)
  hostmem.reuse_freed_memory()
  commit = provenance.git_commit()  # what scores, whatever HEAD is at the end
  from tied_lm import train  # after the flags, so that --help and flag errors skip JAX

  run = train.load_trained(FLAGS.workdir)
  batch_size = FLAGS.eval_batch_size or run.config.eval_batch_size  # both are >= 1
  output = Path(FLAGS.workdir).expanduser() / f"eval_{FLAGS.split}_batch{batch_size}.json"
  if output.is_dir():  # refused before the scoring, which takes minutes at batch 1
    raise UserError(f"{output} is a folder, where the score goes: move it away")
  perplexity, tokens = train.evaluate(run.model, run.params, run.corpus.split(FLAGS.split),
                                      batch_size, run.config.num_steps, FLAGS.split)
  result = {
      **provenance.header("tied_lm.evaluate", commit),
      "split": FLAGS.split,
      "perplexity": perplexity,
      "tokens_scored": tokens,
      "eval_batch_size": batch_size,
      "checkpoint_step": run.checkpoint_step,
  }
  # Printed first: a run directory that cannot be written (a reader's) keeps no file,
  # but the number is not lost.
  print(f"{FLAGS.split} perplexity {perplexity:.2f} over {tokens:,} tokens "
        f"(eval batch {batch_size}, checkpoint {run.checkpoint_step})", flush=True)
  try:
    provenance.write_json(output, result)
  except OSError as error:
    raise UserError(f"could not write {output}: {error.strerror or error}") from None
  print(f"wrote {output}")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=errors.parse_flags)
