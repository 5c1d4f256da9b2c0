r"""Reproduces the paper's tables: trains a grid of runs, then reports them beside the paper.

  python -m experiments.reproduce --root=$HOME/tied_lm_runs --datasets=ptb \
      --sizes=small --variants=vd,al,re,real --parallel=2

Each run of the grid `datasets x sizes x variants` (x every combination of
`--sweep` values, for tuning) is

  python -m tied_lm.main --config=configs/DATASET.py:SIZE,VARIANT \
      --workdir=ROOT/DATASET_SIZE_VARIANT [--config.KEY=VALUE for each --set]

with its output in ROOT/DATASET_SIZE_VARIANT/train.log. A finished run
(results.json) is skipped; a killed one resumes from its last checkpoint when
the harness is run again. SIGTERM, Ctrl-C or a closed terminal (SIGHUP) stops
the running runs at a checkpoint (the harness passes the signal on, once) and
starts no more.
`--parallel` runs several at once (on one GPU each child is given 0.9/parallel
of its memory). `--rescore` then scores each
finished run's best checkpoint on valid and test with eval_batch_size=1, so
every token is conditioned on its whole history (`python -m tied_lm.evaluate`);
after a stop or a failed run it waits for the next invocation. Two runs of the
grid may not share a name (a repeated value), and tied_lm.main refuses a run
directory another process trains in.

The report step (always run; `--train=false` for it alone) reads every run under ROOT and
writes, for each, RESULTS_DIR/DATASET_SIZE_VARIANT.json (final and best-epoch
perplexities, tokens scored, eval batch sizes, parameters, epochs, wall time, hardware,
versions, commit, commands, the per-epoch curve, and the batch-1 scores with the commit
that scored them). A run with epochs done but no results.json yet gets a partial file
("complete": false; best validation so far, no test), which never replaces a finished
run's, nor a partial one with more epochs (a run restarted after its directory was lost).
From all such files in RESULTS_DIR, including those made on other machines, it writes
TABLE.md (ours beside the paper, in the paper's layout, "not run" with the command for the
rest) and one PNG of validation curves per dataset and size (needs matplotlib: `pip
install -e ".[plot]"`); the tagged runs of sweeps go to SWEEP.md instead, and TABLE.md's
last column names each model's best finished run on validation at the default seed,
untagged or not:

  python -m experiments.reproduce --root=$HOME/tied_lm_runs --variants=real \
      --sweep=loss.tau=5,10,20 --sweep=loss.gamma=0.5,0.65,0.8 --parallel=3
"""

import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

from absl import app, flags

from configs import default, paper
from tied_lm import errors, fileio, provenance, reporting, summarize
from tied_lm.errors import UserError
from tied_lm.fileio import atomic_write

FLAGS = flags.FLAGS

# The grid's names are those of configs/paper.py, which builds each run's config.
DATASETS = tuple(paper.DATASETS)
SIZES = tuple(paper.SIZES)
VARIANTS = tuple(paper.VARIANTS)
# Inan et al. 2017, tables 1-3: (valid, test) perplexity, and the paper's parameter count.
PAPER = {
    ("ptb", "small", "vd"): (92.6, 87.3), ("ptb", "small", "al"): (86.3, 82.9),
    ("ptb", "small", "re"): (89.9, 85.1), ("ptb", "small", "real"): (86.3, 82.7),
    ("ptb", "medium", "vd"): (82.0, 77.7), ("ptb", "medium", "al"): (77.4, 74.7),
    ("ptb", "medium", "re"): (77.1, 73.9), ("ptb", "medium", "real"): (75.7, 73.2),
    ("ptb", "large", "vd"): (76.8, 72.6), ("ptb", "large", "al"): (74.5, 71.2),
    ("ptb", "large", "re"): (72.5, 69.0), ("ptb", "large", "real"): (71.1, 68.5),
    ("wikitext2", "small", "al"): (110.3, 103.8), ("wikitext2", "small", "re"): (106.1, 100.5),
    ("wikitext2", "small", "real"): (105.6, 98.9), ("wikitext2", "medium", "al"): (98.8, 93.1),
    ("wikitext2", "medium", "re"): (92.3, 87.7), ("wikitext2", "medium", "real"): (91.5, 87.0),
}
# Keys of every report (`run_report` writes these and more, since the first), which the
# tables and plots read; and theirs, in the two that are objects.
REPORT_KEYS = ("dataset", "variant", "valid_perplexity", "test_perplexity",
               "eval_batch_size", "epochs", "best_epoch", "num_params", "wall_seconds",
               "config", "hardware", "curve")
NESTED_REPORT_KEYS = {"config": ("seed",), "hardware": ("device_kind",)}


def _is_count(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number_or_null(value: Any) -> bool:
  return value is None or summarize.is_number(value)


# The kinds of the values the tables compute with: (test, what it must be).
REPORT_VALUE_KINDS = {
    **dict.fromkeys(("valid_perplexity", "wall_seconds"), (summarize.is_number, "a number")),
    **dict.fromkeys(("epochs", "best_epoch", "eval_batch_size"), (_is_count, "a whole number")),
    # None: a partial run's test, a run whose launch records predate num_params.
    **dict.fromkeys(("test_perplexity", "num_params"), (_is_number_or_null, "a number or null")),
}


def report_problem(report: dict[str, Any]) -> str | None:
  """What keeps `report` from the tables: a key it lacks, or a value of the wrong kind."""
  missing = [key for key in REPORT_KEYS if key not in report] or [
      f"{section}.{key}" for section, keys in NESTED_REPORT_KEYS.items() for key in keys
      if not isinstance(report[section], dict) or key not in report[section]]
  if missing:
    return f"no {', '.join(missing)}"
  for key, (is_kind, kind) in REPORT_VALUE_KINDS.items():
    if not is_kind(report[key]):
      return f"{key}={report[key]!r} is not {kind}"
  if not isinstance(report["curve"], list) or not all(
      isinstance(point, dict) and _is_count(point.get("epoch"))
      and summarize.is_number(point.get("valid_perplexity")) for point in report["curve"]):
    return "its curve is not a list of epochs with their valid_perplexity"
  return None


PAPER_PARAMS = {("medium", "vd"): "20M", ("medium", "real"): "14M",
                ("large", "vd"): "66M", ("large", "real"): "51M"}


def define_flags() -> None:
  """The command's flags; defined only when it runs, so that the module imports cleanly."""
  flags.DEFINE_string("root", None, "Directory holding one workdir per run.")
  flags.DEFINE_list("datasets", ["ptb"], f"Any of {', '.join(DATASETS)}.")
  flags.DEFINE_list("sizes", ["small"], f"Any of {', '.join(SIZES)}.")
  flags.DEFINE_list("variants", list(VARIANTS), f"Any of {', '.join(VARIANTS)}.")
  flags.DEFINE_multi_string("set", [], "Config override KEY=VALUE for every run, e.g. "
                            "model.unroll=5 (passed as --config.KEY=VALUE).")
  flags.DEFINE_multi_string("sweep", [], "KEY=V1,V2,...: also vary this config field; the "
                            "grid takes every combination, each run named by a tag such as "
                            "_tau5_gamma0.5 and reported in SWEEP.md, not TABLE.md.")
  flags.DEFINE_integer("parallel", 1, "Runs trained at the same time.")
  flags.DEFINE_bool("train", True, "Train the grid's unfinished runs before reporting.")
  flags.DEFINE_bool("rescore", False, "Score finished runs on valid and test at batch 1.")
  flags.DEFINE_string("results_dir", str(provenance.REPO / "experiments/results"),
                      "Where the per-run JSON, TABLE.md and the PNGs go.")
  for name in ("root", "results_dir"):
    errors.require_name(name, "a directory")
  errors.require_values("datasets", "sizes", "variants")


def run_name(dataset: str, size: str, variant: str, tag: str = "") -> str:
  return f"{dataset}_{size}_{variant}" + (f"_{tag}" if tag else "")


_GRID = {(d, s, v) for d in DATASETS for s in SIZES for v in VARIANTS}


def parse_run_name(name: str) -> tuple[tuple[str, str, str], str] | None:
  """The inverse of `run_name`: 'ptb_small_al_tau5' -> (('ptb', 'small', 'al'), 'tau5').

  None for a name outside the grid (another results file).
  """
  dataset, size, variant, tag = (name.split("_", 3) + ["", "", ""])[:4]
  model = (dataset, size, variant)
  return (model, tag) if model in _GRID else None


def misplaced(name: str, report: dict[str, Any]) -> str | None:
  """Why a run's report does not belong under its grid name (a folder renamed or copied), or None.

  The name's dataset and variant (tied or not, augmented loss or not) must be the
  report's; its size and output bias may differ, through --set or --sweep (the
  tables then give the size beside the numbers).
  """
  parsed = parse_run_name(name)
  if parsed is None:
    return None
  (dataset, _, variant), _ = parsed
  found = (str(report.get("dataset")), re.split(r"[+-]", str(report.get("variant")))[0])
  if found != (dataset, variant):
    return (f"{name} holds a {found[0]} {found[1]} run, not the {dataset} {variant} its name "
            "says; rename it")
  return None


def sweep_points(sweeps: list[str]) -> list[tuple[str, list[str]]]:
  """['loss.tau=5,10', 'loss.gamma=0.5'] -> [('tau5_gamma0.5', [overrides]), ...].

  Without sweeps: one point, no tag and no overrides.
  """
  points = [("", [])]
  for sweep in sweeps:
    key, _, values = sweep.partition("=")
    if not key or not values:
      raise UserError(f"--sweep {sweep!r} must be KEY=V1,V2,..., e.g. loss.tau=5,10,20")
    name = key.rsplit(".", 1)[-1]
    if "/" in values:  # the tag names the run's folder
      raise UserError(f"--sweep {sweep!r}: a value with '/' cannot be part of a run's folder "
                      "name; give it with --set instead")
    points = [("_".join(filter(None, (tag, f"{name}{value}"))), [*overrides, f"{key}={value}"])
              for tag, overrides in points for value in values.split(",")]
  return points


def train_command(dataset: str, size: str, variant: str, workdir: Path,
                  overrides: list[str]) -> list[str]:
  """The tied_lm.main command line of one run."""
  command = [sys.executable, "-m", "tied_lm.main",
             f"--config=configs/{dataset}.py:{size},{variant}", f"--workdir={workdir}"]
  for override in overrides:
    if "=" not in override:
      raise UserError(f"--set {override!r} must be KEY=VALUE, e.g. model.unroll=5")
    command.append(f"--config.{override}")
  return command


def check_run_configs(grid: list[tuple[str, str, str, tuple[str, list[str]]]]) -> None:
  """Parses and checks each run's config and overrides as tied_lm.main will, before any
  run starts: a mistyped field or a bad value is refused in one line, not after the runs
  before it have trained. The checks that need the devices stay with each run.

  Raises:
    UserError: naming the run and the problem.
  """
  from ml_collections import config_flags

  from tied_lm import train  # JAX, but no backend: the runs need the devices

  for dataset, size, variant, (tag, overrides) in grid:
    command = train_command(dataset, size, variant, Path(), [*FLAGS.set, *overrides])
    # Resolved as the runs resolve it, from the repository's root.
    argv = ["reproduce", f"--config={provenance.REPO}/{command[3].removeprefix('--config=')}",
            *command[5:]]
    run = run_name(dataset, size, variant, tag)
    flag_values = flags.FlagValues()
    try:
      config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values,
                                      sys_argv=argv)
      flag_values(argv)
      train.validate_config(flag_values.config, num_devices=None)
    except (AttributeError, KeyError) as error:  # ml_collections: a field the config lacks
      keys = [f"--{flag}={override.split('=')[0]}" for flag, given in
              (("set", FLAGS.set), ("sweep", overrides)) for override in given]
      raise UserError(f"{run}: {errors.unknown_config_field(error, keys)}") from None
    except flags.Error as error:
      raise UserError(f"{run}: {str(error).strip().splitlines()[-1]}") from None
    except train.ConfigError as error:
      raise UserError(f"{run}: {error}") from None
    # Overrides that make it another model than its name says: trained for hours, then
    # skipped by the reports (`misplaced`).
    _, found_variant = summarize.describe(flag_values.config.to_dict())
    found = {"dataset": flag_values.config.dataset, "variant": found_variant}
    if misplaced(run, found):
      raise UserError(f"{run}: --set/--sweep make it a {found['dataset']} {found_variant} "
                      f"run, not the {dataset} {variant} its name says")


def shell(command: list[str]) -> str:
  """A command as one would type it (`python` for the interpreter)."""
  return shlex.join(["python", *command[1:]] if command[0] == sys.executable else command)


def child_environment(parallel: int) -> dict[str, str]:
  """The environment of a training child; on a shared GPU each takes a share of memory."""
  environment = dict(os.environ)
  if parallel > 1:
    environment.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / parallel:.3f}")
  return environment


class Outcome(NamedTuple):
  """What run_all left: the workdirs not finished, and the first signal it got (or None)."""

  unfinished: list[Path]
  stopped_by: int | None


def check_workdir(workdir: Path) -> None:
  """Refuses, before any run starts, a run's folder with something of the wrong kind in the
  way: it failed as a traceback once the runs before it had started."""
  if workdir.exists() and not workdir.is_dir():
    raise UserError(f"{workdir} is a file, where the run's folder goes: move it away")
  if workdir.is_dir():
    fileio.check_run_directory(workdir)
    if (workdir / "train.log").is_dir():
      raise UserError(f"{workdir / 'train.log'} is a folder, where the run's log goes: move "
                      "it away")
    # A finished run is only reported, with or without its checkpoints; an unfinished one
    # would train again from scratch over its epochs.
    if not (workdir / "results.json").is_file() and not fileio.has_checkpoint(workdir):
      reporting.check_nothing_to_lose(workdir)


def run_all(commands: list[tuple[Path, list[str]]], parallel: int) -> Outcome:
  """Runs the commands, `parallel` at a time, each logging to WORKDIR/train.log.

  SIGTERM, SIGINT (Ctrl-C) or SIGHUP (the terminal closed) to this process is
  passed on, once, to each running command, which saves a checkpoint and exits;
  no further command starts. The commands run in sessions of their own, so a
  signal sent to this process's group does not reach them twice (a second
  signal makes tied_lm.main give up waiting). A signal this process ignores
  (SIGHUP under nohup) stays ignored.

  Returns the workdirs whose command did not finish (failed, stopped by a
  signal: tied_lm.main saves a checkpoint and exits 128 + the signal's number,
  or not started), and the first signal this process got.
  """
  pending, running, unfinished = list(commands), [], []
  environment = child_environment(parallel)
  received = []  # the signals this process got, in order
  forwarded = {}  # process -> how many of them it has been sent

  def receive(signum, frame):
    received.append(signum)

  previous = {signum: signal.signal(signum, receive)
              for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
              if signal.getsignal(signum) != signal.SIG_IGN}
  try:
    while (pending and not received) or running:
      while pending and not received and len(running) < parallel:
        workdir, command = pending.pop(0)
        workdir.mkdir(parents=True, exist_ok=True)
        log = open(workdir / "train.log", "a")
        print(f"start {workdir.name}: {shell(command)}", flush=True)
        running.append((workdir, subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=environment,
            cwd=provenance.REPO, start_new_session=True), log, time.time()))
      time.sleep(1.0)
      for _, process, _, _ in running:
        for signum in received[forwarded.get(process, 0):]:
          process.send_signal(signum)
        forwarded[process] = len(received)
      for item in list(running):
        workdir, process, log, started = item
        if process.poll() is None:
          continue
        running.remove(item)
        log.close()
        took = reporting.format_seconds(time.time() - started)
        if process.returncode == 0:
          print(f"done  {workdir.name} in {took}", flush=True)
          continue
        unfinished.append(workdir)
        if process.returncode - 128 in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
          print(f"stop  {workdir.name} by {signal.Signals(process.returncode - 128).name} "
                f"after {took}; it resumes from its checkpoint when this command runs "
                "again", flush=True)
        else:
          reason = last_error(workdir / "train.log")
          print(f"FAIL  {workdir.name} (exit {process.returncode} after {took})"
                + (f": {reason}" if reason else "") + f"; see {workdir / 'train.log'}",
                flush=True)
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)
  for workdir, _ in pending:
    print(f"skip  {workdir.name}: not started after {signal.Signals(received[0]).name}",
          flush=True)
    unfinished.append(workdir)
  return Outcome(unfinished, received[0] if received else None)


def last_error(log: Path) -> str | None:
  """The one-line `error: ...` a command ended its log with, if it did (bad input)."""
  with open(log, "rb") as f:
    f.seek(max(f.seek(0, os.SEEK_END) - 4096, 0))
    lines = f.read().decode("utf-8", "replace").strip().splitlines()
  return lines[-1] if lines and lines[-1].startswith("error: ") else None


def current_batch1(workdir: Path, split: str) -> dict[str, Any] | None:
  """The run's batch-1 score of `split` if it is of its newest checkpoint, else None.

  A score made before the run trained on (more epochs, or during training)
  is of older parameters. Scores without a checkpoint_step are taken as they are.
  """
  path = workdir / f"eval_{split}_batch1.json"
  if not path.is_file():
    return None
  result = fileio.read_json(path)
  checkpoints = workdir / "checkpoints"
  steps = [int(d.name) for d in checkpoints.iterdir() if d.name.isdigit()] if (
      checkpoints.is_dir()) else []
  if steps and result.get("checkpoint_step", max(steps)) != max(steps):
    return None
  return result


def rescore(workdir: Path) -> None:
  """Batch-1 perplexity of the best checkpoint on valid and test (skips what is current)."""
  for split in ("valid", "test"):
    if current_batch1(workdir, split) is not None:
      continue
    command = [sys.executable, "-m", "tied_lm.evaluate", f"--workdir={workdir}",
               f"--split={split}", "--eval_batch_size=1"]
    print(f"rescore {workdir.name} {split}: {shell(command)}", flush=True)
    status = subprocess.run(command, cwd=provenance.REPO).returncode
    if status:
      raise UserError(f"rescoring {workdir} on {split} failed (exit {status}); its output is above")


def run_report(workdir: Path) -> dict[str, Any]:
  """The per-run results file's contents, from a run's workdir.

  A run still training (no results.json yet, at least one epoch done) gives a
  partial report: `complete` false, the best validation perplexity so far, and
  no test perplexity (scored once, at the end).
  """
  epochs = reporting.read_records(workdir, "epoch")
  launches = fileio.read_json_lines(workdir / "launches.jsonl", appended=True) if (
      workdir / "launches.jsonl").is_file() else []
  results_file = workdir / "results.json"
  finished = fileio.read_json(results_file) if results_file.is_file() else None
  complete = finished is not None
  epochs_completed = finished["epochs_completed"] if finished else epochs[-1]["epoch"]
  # Commit and host of the last launch that trained (a finished run's relaunch only
  # re-evaluates it); hand-written records of older runs have no epochs_done.
  trained = [launch for launch in launches
             if launch.get("epochs_done", 0) < epochs_completed] or launches
  trainer = trained[-1] if trained else None
  if finished:
    results = finished
  else:
    last = epochs[-1]
    config = fileio.read_json(workdir / "config.json")
    results = {
        "dataset": config["dataset"], "config": config,
        "valid_perplexity": last["best_valid_perplexity"],
        "valid_tokens_scored": last["valid_tokens_scored"],
        "test_perplexity": None, "test_tokens_scored": None,
        "eval_batch_size": config["eval_batch_size"], "best_epoch": last["best_epoch"],
        "epochs_completed": last["epoch"],
        "num_params": trainer.get("num_params") if trainer else None,
        "train_tokens_per_second": last["train_tokens_per_second"],
        "wall_seconds": last["wall_seconds"],
        # Launch records older than versions, devices and num_params in them give None.
        "versions": trainer.get("versions") if trainer else None,
        "device_kind": trainer["device_kind"] if trainer else None,
        "devices": trainer.get("devices") if trainer else None}
  size, variant = summarize.describe(results["config"])
  report = {
      "dataset": results["dataset"], "size": size, "variant": variant,
      "complete": complete, "num_epochs": results["config"]["num_epochs"],
      "valid_perplexity": results["valid_perplexity"],
      "valid_tokens_scored": results["valid_tokens_scored"],
      "test_perplexity": results["test_perplexity"],
      "test_tokens_scored": results["test_tokens_scored"],
      "eval_batch_size": results["eval_batch_size"],
      "best_epoch": results["best_epoch"], "epochs": results["epochs_completed"],
      "num_params": results["num_params"],
      "train_tokens_per_second": results["train_tokens_per_second"],
      "wall_seconds": results["wall_seconds"],
      # Stops (SIGSTOP) that wall_seconds leaves out; None where records before
      # tied_lm.reporting.RunningClock counted them in.
      "paused_seconds": (
          sum(r["paused_seconds"] for r in epochs)
          if epochs and all(r.get("paused_seconds") is not None for r in epochs) else None),
      "hardware": {"device_kind": results.get("device_kind"), "devices": results["devices"],
                   "host_cpu": trainer["host_cpu"] if trainer else None,
                   "host_cpu_details": trainer.get("host_cpu_details") if trainer else None},
      "versions": results["versions"],
      "commit": trainer["commit"] if trainer else None,
      "commands": launches,
      "config": results["config"],
      "curve": [{k: r[k] for k in ("epoch", "learning_rate", "train_perplexity",
                                   "valid_perplexity", "wall_seconds", "paused_seconds")
                 if k in r}
                for r in epochs],
  }
  for split in ("valid", "test"):
    result = current_batch1(workdir, split)
    if result is not None:
      report[f"{split}_perplexity_batch1"] = result["perplexity"]
      report[f"{split}_tokens_scored_batch1"] = result["tokens_scored"]
      # Scores written before tied_lm.evaluate recorded its commit have none.
      report[f"{split}_batch1_commit"] = result.get("commit")
  return report


def _cell(report: dict[str, Any] | None, key: str, digits: int = 1) -> str:
  """'valid / test', with '-' for what was not scored (a partial run has no test yet)."""
  values = [report.get(f"{split}_{key}") for split in ("valid", "test")] if report else []
  if not values or values[0] is None:
    return "-"
  return " / ".join("-" if value is None else f"{value:.{digits}f}" for value in values)


def _params(num_params: int | None, paper_params: str = "") -> str:
  """'13.3M (14M)': ours, then the paper's count where it gives one."""
  ours = "-" if num_params is None else f"{num_params / 1e6:.1f}M"
  return f"{ours} ({paper_params})" if paper_params else ours


def _hardware(report: dict[str, Any]) -> str:
  """The accelerator's name, or for a CPU run the CPU's (device_kind alone says 'cpu')."""
  hardware = report["hardware"]
  if hardware["device_kind"] == "cpu" and hardware.get("host_cpu"):
    return f"{hardware['host_cpu']} (CPU)"
  return hardware["device_kind"]


def _size_note(report: dict[str, Any], size: str) -> str:
  """' (16 units)' where --set or --sweep changed the model's size from its row's; else ''."""
  actual = report.get("size", size)
  return "" if actual == size else f" ({actual})"


def _epochs(report: dict[str, Any], with_best: bool = True) -> str:
  """'40 (39)': epochs done (best); a run still training says so: '13 of 40 (13), partial'."""
  complete = report.get("complete", True)  # files from before partial reports are finished
  done = f"{report['epochs']}" if complete else f"{report['epochs']} of {report['num_epochs']}"
  best = f" ({report['best_epoch']})" if with_best else ""
  return done + best + ("" if complete else ", partial")


def chosen_on_validation(
    reports: dict[tuple[str, str, str], dict[str, Any]], swept: dict[str, dict[str, Any]]
) -> dict[tuple[str, str, str], tuple[str, dict[str, Any]]]:
  """Per model, the finished run with the best validation perplexity: (its tag, report).

  The candidates are the untagged run (tag '') and the sweeps of the same model
  at the configs' default seed, so that a lucky seed is never what gets chosen.
  """
  default_seed = default.get_config().seed  # configs/paper.py leaves it as is
  candidates = [(key, "", report) for key, report in reports.items()] + [
      (*parse_run_name(name), report) for name, report in swept.items()]
  chosen = {}
  for key, tag, report in candidates:
    if report["test_perplexity"] is None or report["config"]["seed"] != default_seed:
      continue
    if key not in chosen or report["valid_perplexity"] < chosen[key][1]["valid_perplexity"]:
      chosen[key] = (tag, report)
  return chosen


def other_seeds(key: tuple[str, str, str], tag: str,
                swept: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
  """The finished runs of a model's settings `tag` at other seeds: those tagged TAG_seedN.

  `--sweep=seed=N` given last (after the settings' sweeps) names a run that way.
  """
  pattern = re.compile(re.escape(run_name(*key, tag)) + r"_seed\d+")
  runs = [report for name, report in swept.items()
          if pattern.fullmatch(name) and report["test_perplexity"] is not None]
  return sorted(runs, key=lambda report: report["config"]["seed"])


def _chosen_cell(key: tuple[str, str, str],
                 chosen: dict[tuple[str, str, str], tuple[str, dict[str, Any]]],
                 swept: dict[str, dict[str, Any]]) -> str:
  """'86.5 / 82.7 ([tag](file.json)); seeds 0, 1: mean 86.9 / 83.0', or '-' where no
  finished run qualifies (the mean only where the settings ran at other seeds)."""
  if key not in chosen:
    return "-"
  tag, report = chosen[key]
  cell = (f"{_cell(report, 'perplexity')}{_size_note(report, key[1])} "
          f"([{tag or 'paper settings'}]({run_name(*key, tag)}.json))")
  runs = [report, *other_seeds(key, tag, swept)]
  if len(runs) > 1:
    mean = {f"{split}_perplexity": statistics.mean(r[f"{split}_perplexity"] for r in runs)
            for split in ("valid", "test")}
    seeds = ", ".join(str(r["config"]["seed"]) for r in runs)
    cell += f"; seeds {seeds}: mean {_cell(mean, 'perplexity')}"
  return cell


def table(reports: dict[tuple[str, str, str], dict[str, Any]], root_hint: str,
          notes: str = "",
          chosen: dict[tuple[str, str, str], tuple[str, dict[str, Any]]] | None = None,
          swept: dict[str, dict[str, Any]] | None = None) -> str:
  """TABLE.md: per dataset, the paper's rows (size x variant) with ours beside them.

  `ours` is the untagged run (configs/paper.py's settings); `chosen` (from
  `chosen_on_validation`) adds each model's best run on validation, and the mean
  over seeds of its settings where `swept` has runs of them at other seeds.
  """
  chosen, swept = chosen or {}, swept or {}
  lines = ["# Reproducing Inan et al. 2017: perplexity, validation / test", "",
           "Written by `python -m experiments.reproduce` from the JSON files beside it",
           "(and from TABLE_NOTES.md, copied in at the end). Params: ours (the paper's).",
           "Ours: the epoch with the best validation perplexity, and test at that epoch.",
           "`ours` is the training run's own evaluation at its eval batch size (each row",
           "starts from a zero state); `ours, batch 1` rescores the same checkpoint with",
           "every token conditioned on its whole history, where that was run.",
           "`chosen on validation`: of the finished runs of the model at the default seed",
           "(the untagged one and its sweeps, SWEEP.md), the one with the best validation",
           "perplexity, named by its tag (the settings it changes); where the same",
           "settings also ran at other seeds (tagged TAG_seedN), the seeds and their mean.",
           "A size in brackets after the numbers: the run's model is not its row's size",
           "(changed by --set or --sweep).",
           ""]
  for dataset in DATASETS:
    keys = [k for k in PAPER if k[0] == dataset] + [
        k for k in reports if k[0] == dataset and k not in PAPER]
    if not keys:
      continue
    lines += [f"## {dataset}", "",
              "| size | variant | paper | ours | eval batch | ours, batch 1 | params "
              "| epochs (best) | hardware | wall | chosen on validation |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in keys:
      _, size, variant = key
      paper = PAPER.get(key)
      paper_cell = f"{paper[0]} / {paper[1]}" if paper else "-"
      report = reports.get(key)
      if report is None:
        command = (f"python -m experiments.reproduce --root={root_hint} --datasets={dataset} "
                   f"--sizes={size} --variants={variant} --rescore")
        lines.append(f"| {size} | {variant.upper()} | {paper_cell} | not run: `{command}` "
                     f"| | | {_params(None, PAPER_PARAMS.get((size, variant), ''))} | | | "
                     f"| {_chosen_cell(key, chosen, swept)} |")
        continue
      lines.append(
          f"| {size} | {variant.upper()} | {paper_cell} "
          f"| {_cell(report, 'perplexity')}{_size_note(report, size)} "
          f"| {report['eval_batch_size']} | {_cell(report, 'perplexity_batch1')} "
          f"| {_params(report['num_params'], PAPER_PARAMS.get((size, variant), ''))} "
          f"| {_epochs(report)} "
          f"| {_hardware(report)} "
          f"| {reporting.format_seconds(report['wall_seconds'])} "
          f"| {_chosen_cell(key, chosen, swept)} |")
    lines.append("")
  if notes:
    lines += ["## Notes", "", notes.strip(), ""]
  return "\n".join(lines)


def sweep_table(swept: dict[str, dict[str, Any]],
                reports: dict[tuple[str, str, str], dict[str, Any]]) -> str:
  """SWEEP.md: the tagged runs, best validation perplexity first within each model.

  Each model's untagged run (configs/paper.py's settings), where there is one,
  is ranked with its sweep for reference.
  """
  lines = ["# Sweeps: choose on validation", "",
           "Written by `python -m experiments.reproduce` from the tagged JSON files beside it,",
           "each model's sweep ranked with its untagged run (configs/paper.py's settings).",
           "`batch 1`: the best checkpoint rescored at eval batch 1 (`--rescore`), where run.",
           "", "| run | valid (best epoch) | test | batch 1 | epochs | hardware | wall |",
           "|---|---|---|---|---|---|---|"]
  models = {parse_run_name(name)[0] for name in swept}
  rows = dict(swept)
  rows.update({run_name(*key): reports[key] for key in models if key in reports})
  def order(item):
    name, report = item
    return parse_run_name(name)[0], report["valid_perplexity"]
  for name, report in sorted(rows.items(), key=order):
    test = report["test_perplexity"]
    lines.append(
        f"| {name} | {report['valid_perplexity']:.2f} ({report['best_epoch']}) "
        f"| {'-' if test is None else f'{test:.2f}'} "
        f"| {_cell(report, 'perplexity_batch1', digits=2)} "
        f"| {_epochs(report, with_best=False)} "
        f"| {_hardware(report)} "
        f"| {reporting.format_seconds(report['wall_seconds'])} |")
  return "\n".join(lines) + "\n"


def write_reports(root: Path, results_dir: Path) -> None:
  """Per-run JSON for every run under root with an epoch done, then TABLE.md and the PNGs.

  Without a root directory (its runs deleted, or a fresh checkout), the tables come from
  the JSON files already in results_dir.
  """
  results_dir.mkdir(parents=True, exist_ok=True)
  if root.is_dir():
    workdirs = sorted(root.iterdir())
  else:
    print(f"no run directory {root}: reporting the JSON files in {results_dir}")
    workdirs = []
  for workdir in workdirs:
    try:
      if not ((workdir / "results.json").is_file() or (
          (workdir / "metrics.jsonl").is_file() and reporting.read_records(workdir, "epoch"))):
        continue
      report = run_report(workdir)
    except UserError as error:  # a damaged file (truncated JSON, say), named in the message
      print(f"skipped {workdir}: {error}", file=sys.stderr)
      continue
    except (OSError, KeyError, TypeError, AttributeError, IndexError) as error:
      # A folder copied in part, or another tool's files.
      print(f"skipped {workdir}: not a complete tied_lm run ({type(error).__name__}: {error})",
            file=sys.stderr)
      continue
    if reason := misplaced(workdir.name, report):
      print(f"skipped {workdir}: {reason}", file=sys.stderr)
      continue
    output = results_dir / f"{workdir.name}.json"
    previous = None
    if output.is_file():
      try:
        previous = fileio.read_json(output)
        problem = report_problem(previous)
      except UserError as damaged:
        problem = str(damaged)
      if problem:  # the run at hand writes it again
        print(f"replacing {output}: {problem}", file=sys.stderr)
        previous = None
    if not report["complete"] and previous is not None:
      if previous.get("complete", True):
        print(f"kept {output}: a finished run's report, not replaced by {workdir}'s partial one")
        continue
      if previous.get("epochs", 0) > report["epochs"]:
        # A run restarted after its directory was lost keeps the longer curve until it
        # catches up.
        print(f"kept {output}: {previous['epochs']} epochs, not replaced by {workdir}'s "
              f"{report['epochs']}")
        continue
    provenance.write_json(output, report)
    print(f"wrote {output}")
  reports, swept = {}, {}
  for path in sorted(results_dir.glob("*.json")):
    parsed = parse_run_name(path.stem)
    if parsed is None:
      continue
    model, tag = parsed
    report = fileio.read_json(path)
    # The table would fail on another file under a grid name, as a traceback.
    if problem := report_problem(report):
      raise UserError(f"{path} is not a run report ({problem}): move it away, "
                      "or write it again from its run with --root")
    if reason := misplaced(path.stem, report):
      print(f"skipped {path}: {reason}", file=sys.stderr)
    elif tag:
      swept[path.stem] = report
    else:
      reports[model] = report
  if swept:
    atomic_write(results_dir / "SWEEP.md", sweep_table(swept, reports))
    print(f"wrote {results_dir / 'SWEEP.md'}")
  notes_file = results_dir / "TABLE_NOTES.md"
  notes = notes_file.read_text() if notes_file.is_file() else ""
  atomic_write(results_dir / "TABLE.md", table(reports, "$HOME/tied_lm_runs", notes,
                                                chosen_on_validation(reports, swept), swept))
  print(f"wrote {results_dir / 'TABLE.md'}")
  for dataset in DATASETS:
    for size in SIZES:
      runs = [{"run": variant, "size": size, "variant": variant,
               "curve": [(c["epoch"], c["valid_perplexity"]) for c in reports[key]["curve"]]}
              for variant in VARIANTS if (key := (dataset, size, variant)) in reports]
      runs = [run for run in runs if run["curve"]]  # reports of runs without their records
      if runs:
        output = results_dir / f"curves_{dataset}_{size}.png"
        summarize.plot_curves(runs, output, f"{dataset} {size}: validation perplexity")
        print(f"wrote {output}")


@errors.command
def main(argv: list[str]) -> None:
  errors.no_positional_arguments(argv)
  for name, values, allowed in (("datasets", FLAGS.datasets, DATASETS),
                                ("sizes", FLAGS.sizes, SIZES),
                                ("variants", FLAGS.variants, VARIANTS)):
    unknown = sorted(set(values) - set(allowed))
    if unknown:
      raise UserError(f"--{name}: unknown {', '.join(unknown)}; choose from "
                      f"{', '.join(allowed)}")
  if FLAGS.parallel < 1:
    raise UserError(f"--parallel={FLAGS.parallel} must be at least 1")
  root = Path(FLAGS.root).expanduser().resolve()
  results_dir = Path(FLAGS.results_dir).expanduser().resolve()
  if root.exists() and not root.is_dir():
    raise UserError(f"--root={root} is a file, not a directory of runs")
  if (root / "config.json").is_file():  # its runs' reports would be none, or nested in it
    raise UserError(f"--root={root} is a run's directory (it has config.json): give the "
                    "folder that holds the runs")
  # Checked before any training: a bad results_dir would otherwise fail after the grid.
  fileio.check_writable_directory(results_dir, "--results_dir")
  grid = [(d, s, v, point) for d in FLAGS.datasets for s in FLAGS.sizes
          for v in FLAGS.variants for point in sweep_points(FLAGS.sweep)]
  workdirs = [root / run_name(d, s, v, tag) for d, s, v, (tag, _) in grid]
  repeated = sorted({w.name for w in workdirs if workdirs.count(w) > 1})
  if repeated:
    raise UserError(f"the grid names {', '.join(repeated)} more than once: a value is "
                    "repeated in --datasets, --sizes, --variants or a --sweep")
  unfinished, stopped_by = [], None
  if FLAGS.train:
    fileio.check_writable_directory(root, "--root")
    check_run_configs(grid)
    for workdir in workdirs:
      check_workdir(workdir)
    commands = [(workdir, train_command(d, s, v, workdir, [*FLAGS.set, *overrides]))
                for (d, s, v, (_, overrides)), workdir in zip(grid, workdirs, strict=True)
                if not (workdir / "results.json").is_file()]
    unfinished, stopped_by = run_all(commands, FLAGS.parallel)
  # After a stop or a failure, no rescoring (it takes long; the next run does it), but
  # the reports still take in every finished run and every partial one.
  if FLAGS.rescore and not unfinished:
    for workdir in workdirs:
      if (workdir / "results.json").is_file():
        rescore(workdir)
  write_reports(root, results_dir)
  if stopped_by is not None:
    # A preempted job says so by its status, as tied_lm.main does (schedulers requeue on it).
    print(f"stopped by {signal.Signals(stopped_by).name}: {len(unfinished)} run(s) resume "
          "from their checkpoints when this command runs again", file=sys.stderr)
    sys.exit(128 + stopped_by)
  if unfinished:
    raise UserError(f"{len(unfinished)} run(s) did not finish: "
                    f"{', '.join(w.name for w in unfinished)}")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=errors.parse_flags)
