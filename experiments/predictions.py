r"""What trained models predict: the paper's qualitative comparison of VD and REAL.

  python -m experiments.predictions \
      --workdirs=$HOME/tied_lm_runs/ptb_small_vd,$HOME/tied_lm_runs/ptb_small_real

For each run's best checkpoint it measures, over every position of the
validation split, the average predicted probability of <unk> and of the five
most frequent training words, and lists the ten most likely next words after
each prompt (`tied_lm.analysis`). The paper found that REAL gives less
probability to <unk> and to very frequent words, and puts semantically close
words in its top ten. Writes JSON and a Markdown table (--output prefix).
"""

import collections
import time
from typing import TYPE_CHECKING

from absl import app, flags

from tied_lm import data, errors, provenance, summarize
from tied_lm.errors import UserError

if TYPE_CHECKING:  # imports JAX: --help and flag errors answer without it
  from tied_lm import train

FLAGS = flags.FLAGS
PROMPTS = ("the company said", "the stock market", "he said the", "in new york")


def define_flags() -> None:
  flags.DEFINE_list("workdirs", None, "Run directories of tied_lm.main (e.g. vd and real).")
  flags.DEFINE_multi_string("prompt", list(PROMPTS), "Prompts for the top-10 next words.")
  flags.DEFINE_integer("num_frequent", 5, "How many of the most frequent words to track.")
  flags.DEFINE_string("output", str(provenance.REPO / "experiments/results/predictions"),
                      "Path prefix: PREFIX.json and PREFIX.md.")
  errors.require_values("workdirs")
  errors.require_distinct_folders("workdirs")


def frequent_words(corpus: data.Corpus, count: int) -> list[int]:
  """Ids of the `count` most frequent words of the training split, <unk> excluded."""
  counts = collections.Counter(corpus.train.tolist())
  unk = corpus.vocab.index(data.UNK) if data.UNK in corpus.vocab else None
  return [word for word, _ in counts.most_common(count + 1) if word != unk][:count]


def describe_run(workdir: str, run: "train.TrainedRun", prompts: dict[str, list[int]],
                 num_frequent: int) -> dict:
  """One run's average probabilities and top-10 lists (prompts: as its word ids)."""
  # Imported here, not at the top: --help and flag errors then answer without JAX (about 4 s).
  from tied_lm import analysis

  vocab = run.corpus.vocab
  tracked = ([vocab.index(data.UNK)] if data.UNK in vocab else []) + frequent_words(
      run.corpus, num_frequent)
  averages = analysis.average_probabilities(
      run.model, run.params, run.corpus.valid, tracked, num_steps=run.config.num_steps)
  size, variant = summarize.describe(run.config.to_dict())
  return {
      "workdir": str(workdir), "size": size, "variant": variant,
      "checkpoint_step": run.checkpoint_step,
      "average_probability": {vocab[w]: float(p) for w, p in zip(tracked, averages,
                                                                 strict=True)},
      "top_next_words": {
          prompt: analysis.top_next_words(run.model, run.params, vocab, ids)
          for prompt, ids in prompts.items()},
  }


def markdown(runs: list[dict]) -> str:
  """The runs' average probabilities (a column per word any run tracks; '-' where a run,
  of another corpus, does not) and top-10 lists, each labelled by run and variant."""
  words = list(dict.fromkeys(w for run in runs for w in run["average_probability"]))
  labels = summarize.run_labels([run["workdir"] for run in runs])
  lines = ["| run | variant | " + " | ".join(f"p({w})" for w in words) + " |",
           "|---|---|" + "---|" * len(words)]
  for run, label in zip(runs, labels, strict=True):
    probabilities = run["average_probability"]
    cells = " | ".join(f"{probabilities[w]:.4f}" if w in probabilities else "-" for w in words)
    lines.append(f"| {label} | {run['variant']} | {cells} |")
  for prompt in runs[0]["top_next_words"]:
    lines += ["", f"Top 10 after *{prompt}*:", ""]
    for run, label in zip(runs, labels, strict=True):
      top = ", ".join(f"{word} {p:.3f}" for word, p in run["top_next_words"][prompt])
      lines.append(f"- {label} ({run['variant']}): {top}")
  return "\n".join(lines)


@errors.command
def main(argv: list[str]) -> None:
  errors.no_positional_arguments(argv)
  if FLAGS.num_frequent < 0:
    raise UserError(f"--num_frequent={FLAGS.num_frequent} must be >= 0")
  prefix = provenance.output_prefix(FLAGS.output)  # before the runs are scored
  start = time.time()
  commit = provenance.git_commit()  # what runs, whatever HEAD is at the end
  from tied_lm import sample, train  # JAX: after the flags, as in describe_run

  # Every run loaded and every prompt encoded before any is scored: a bad last
  # workdir or prompt is refused at once, not after minutes of scoring the others.
  loaded = [train.load_trained(w) for w in FLAGS.workdirs]
  prompts = [{p: sample.encode_prompt(p, run.corpus.vocab) for p in FLAGS.prompt}
             for run in loaded]
  runs = [describe_run(w, run, ids, FLAGS.num_frequent)
          for w, run, ids in zip(FLAGS.workdirs, loaded, prompts, strict=True)]
  results = {
      **provenance.header("experiments.predictions", commit),
      "runs": runs, "wall_seconds": time.time() - start,
  }
  table = markdown(runs)
  provenance.write_results(prefix, results, (
      f"Average predicted probability over the validation split, and the ten most likely "
      f"next words. Command: `{results['command']}`, commit `{results['commit'][:7]}`.\n\n"
      f"{table}\n"))
  print(table)
  print(f"wrote {prefix}.json and .md")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=errors.parse_flags)
