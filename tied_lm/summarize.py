"""A table of runs, and their validation curves: python -m tied_lm.summarize WORKDIR [...].

  python -m tied_lm.summarize /tmp/ptb_small_vd /tmp/ptb_small_real --plot=curves.png

Prints a Markdown table (dataset, size, variant, epochs, best valid
perplexity, test perplexity, tokens scored, parameters, tokens/s, wall time)
that pastes into a paper or a bug report. A run still in progress shows its
epochs so far and no test perplexity (in its first epoch: 0, and dashes).
`--plot` needs matplotlib (`pip install -e ".[plot]"`).
"""

import os
import statistics
import sys
from pathlib import Path
from typing import Any

from absl import app, flags

from tied_lm import errors, reporting
from tied_lm.errors import UserError
from tied_lm.fileio import check_run_directory, check_writable_directory, read_json

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags; defined only when it runs, so that the module imports cleanly."""
  flags.DEFINE_string(
      "plot", None, "Also draw the runs' validation curves into this image (.png, .pdf or .svg)."
  )
  errors.require_name("plot", "an image file", optional=True)

# (hidden size -> name) and ((tie, bias, augmented) -> name) as in configs/paper.py;
# tests/test_summarize.py checks that the two agree.
SIZES = {200: "small", 650: "medium", 1500: "large"}
VARIANTS = {
    (False, True, False): "vd",
    (False, True, True): "al",
    (True, False, False): "re",
    (True, False, True): "real",
}


def describe(config: dict[str, Any]) -> tuple[str, str]:
  """(size, variant) of a config dict, in the paper's names ('real+bias' for tied with a bias)."""
  model = config["model"]
  size = SIZES.get(model["hidden_size"], f"{model['hidden_size']} units")
  if model["embed_dim"] != model["hidden_size"]:
    size = f"{model['embed_dim']}/{model['hidden_size']} units"
  tie, bias, augmented = model["tie_embeddings"], model["output_bias"], config["loss"]["augmented"]
  if (tie, bias, augmented) in VARIANTS:
    return size, VARIANTS[tie, bias, augmented]
  # The paper's variant with the output bias switched from the paper's choice.
  return size, VARIANTS[tie, not bias, augmented] + ("+bias" if bias else "-bias")


def load_run(workdir: Path) -> dict[str, Any]:
  """What the table shows of one run directory; UserError if it is not one."""
  check_run_directory(workdir)
  config_file, results_file = workdir / "config.json", workdir / "results.json"
  results = read_json(results_file) if results_file.is_file() else None
  if not config_file.is_file() and results is None:
    raise UserError(f"{workdir} is not a tied_lm run (no config.json or results.json)")
  epochs = reporting.read_records(workdir, "epoch")
  if not epochs and results is not None:
    raise UserError(f"{workdir / 'metrics.jsonl'} holds no epoch record, though results.json "
                    "says the run finished: restore the file")
  try:
    config = read_json(config_file) if config_file.is_file() else results["config"]
    return _summary(workdir, config, results, epochs)
  except (KeyError, TypeError, AttributeError) as error:  # a file edited or written by another tool
    raise UserError(f"{workdir} holds a config.json, results.json or metrics.jsonl that is not "
                    f"a tied_lm run's (missing or wrong field: {error})") from None


def is_number(value: Any) -> bool:
  """Whether a value read from a run's JSON files is a number (JSON's true is not)."""
  return isinstance(value, int | float) and not isinstance(value, bool)


def _number(value: Any, required: bool = False) -> float | None:
  """A number read from a run's files (None stays None unless `required`); TypeError for
  anything else."""
  if (value is not None or required) and not is_number(value):
    raise TypeError(f"{value!r} is not a number")
  return value


def _summary(workdir: Path, config: dict[str, Any], results: dict[str, Any] | None,
             epochs: list[dict[str, Any]]) -> dict[str, Any]:
  """One row of the table; a run still in its first epoch has None for its numbers."""
  # An epoch record always has these: null would show a finished run as not yet scored.
  best = min(epochs, key=lambda r: _number(r["valid_perplexity"], True)) if epochs else None
  size, variant = describe(config)
  finished = results is not None
  return {
      "run": workdir.name,
      "dataset": config["dataset"],
      "size": size,
      "variant": variant,
      "epochs": len(epochs),
      "best_valid_perplexity": best and best["valid_perplexity"],
      "best_epoch": best and best["epoch"],
      "test_perplexity": _number(results["test_perplexity"]) if finished else None,
      "test_tokens_scored": _number(results["test_tokens_scored"]) if finished else None,
      "num_params": _number(results["num_params"]) if finished else None,
      # The median, as results.json takes it.
      "tokens_per_second": statistics.median(
          _number(r["train_tokens_per_second"], True) for r in epochs) if epochs else None,
      "wall_seconds": _number(epochs[-1]["wall_seconds"], True) if epochs else None,
      "curve": [(r["epoch"], r["valid_perplexity"]) for r in epochs],
  }


def run_labels(workdirs: list[str]) -> list[str]:
  """Names that tell the runs apart: each folder's name ('.' resolved), or the paths as
  given where two folders share a name (a/run, b/run)."""
  names = [Path(w).expanduser().resolve().name or str(w) for w in workdirs]
  return names if len(set(names)) == len(names) else [str(w) for w in workdirs]


def table(runs: list[dict[str, Any]]) -> str:
  """The runs as a Markdown table."""
  header = ("run", "dataset", "size", "variant", "epochs", "best valid ppl (epoch)",
            "test ppl", "test tokens", "params", "train tok/s", "wall")
  rows = [header, tuple("---" for _ in header)]
  for run in runs:
    if run["best_valid_perplexity"] is None:  # still in its first epoch
      numbers = ("-",) * 6
    else:
      numbers = (
          f"{run['best_valid_perplexity']:.2f} ({run['best_epoch']})",
          "-" if run["test_perplexity"] is None else f"{run['test_perplexity']:.2f}",
          "-" if run["test_tokens_scored"] is None else f"{run['test_tokens_scored']:,}",
          "-" if run["num_params"] is None else f"{run['num_params'] / 1e6:.2f}M",
          f"{run['tokens_per_second']:,.0f}", reporting.format_seconds(run["wall_seconds"]))
    rows.append((run["run"], run["dataset"], run["size"], run["variant"], str(run["epochs"]),
                 *numbers))
  return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def check_plot_path(path: Path) -> None:
  """Refuses a plot path that savefig would fail on, before any work."""
  # matplotlib reads the format as os.path.splitext does: ".png" and "..png" have none.
  suffix = os.path.splitext(path.name)[1].lower()
  named = path.name.lower().lstrip(".")
  if not suffix and named in ("png", "pdf", "svg"):
    raise UserError(f"--plot={path}: the image needs a name before .{named}, "
                    f"e.g. curves.{named}")
  if suffix not in (".png", ".pdf", ".svg"):
    raise UserError(f"--plot={path}: the file must end in .png, .pdf or .svg")
  if not path.parent.is_dir():
    raise UserError(f"--plot={path}: no directory {path.parent}")
  if path.is_dir():
    raise UserError(f"--plot={path} is a folder; name an image file")
  check_writable_directory(path.parent, "the folder of --plot")
  pyplot()  # without matplotlib, say so before the table, not after it


def pyplot() -> Any:
  """matplotlib.pyplot on the file-only Agg backend, or a UserError saying how to install it."""
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    raise UserError('plotting needs matplotlib: pip install -e ".[plot]"') from None
  return plt


def plot_curves(runs: list[dict[str, Any]], path: Path, title: str = "") -> None:
  """Validation perplexity against epoch, one line per run, into an image file."""
  plt = pyplot()
  import matplotlib.ticker

  figure, axes = plt.subplots(figsize=(6.4, 4.0))
  for run in (run for run in runs if run["curve"]):  # none yet in a run's first epoch
    epochs, perplexities = zip(*run["curve"], strict=True)
    axes.plot(epochs, perplexities, marker="o", markersize=3,
              label=f"{run['run']} ({run['size']}, {run['variant']})")
  axes.set_xlabel("epoch")
  axes.set_ylabel("validation perplexity")
  axes.set_yscale("log")
  # Plain numbers on the log axis, minor ticks included (perplexity curves span <1 decade).
  plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
  axes.yaxis.set_major_formatter(plain)
  axes.yaxis.set_minor_formatter(plain)
  axes.set_title(title or "validation perplexity")
  axes.grid(True, which="both", alpha=0.3)
  axes.legend()
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


@errors.command
def main(argv: list[str]) -> None:
  if len(argv) < 2:
    raise UserError("usage: python -m tied_lm.summarize WORKDIR [WORKDIR...] [--plot=F]")
  if FLAGS.plot:
    check_plot_path(Path(FLAGS.plot))
  runs = [{**load_run(Path(directory)), "run": label}
          for directory, label in zip(argv[1:], run_labels(argv[1:]), strict=True)]
  print(table(runs))
  if FLAGS.plot and not any(run["curve"] for run in runs):
    print(f"no epoch has finished yet: {FLAGS.plot} not drawn", file=sys.stderr)
  elif FLAGS.plot:
    plot_curves(runs, Path(FLAGS.plot))
    print(f"wrote {FLAGS.plot}")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=errors.parse_flags)
