"""Where a result came from: commit, hardware and library versions.

For the results JSON of the experiments, and for each training run's
launches.jsonl (one line per start or resume of `tied_lm.main`).
"""

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from tied_lm.errors import UserError
from tied_lm.fileio import RUN_DIRECTORY_LAYOUT, atomic_write, check_writable_directory

# The checkout holding this package (an installed copy has no git: commit "unknown").
# The experiments use it as their checkout too: `python -m experiments.X` runs from a
# checkout (or with it on PYTHONPATH), and Python then imports this package from the
# same checkout, ahead of any installed copy.
REPO = Path(__file__).resolve().parent.parent


def git_commit() -> str:
  """$TIED_LM_COMMIT if set, else HEAD (+dirty for uncommitted tracked changes).

  Changes under experiments/results/ do not count: one harness rewriting its
  results there would otherwise mark the next one's run dirty.

  A copy of the tree shipped to another machine names its commit through the
  environment variable: the copy's own .git, if any, need not match its files.
  """
  if os.environ.get("TIED_LM_COMMIT"):
    return os.environ["TIED_LM_COMMIT"]

  def git(*args):
    try:
      return subprocess.run(
          ["git", *args], cwd=REPO, capture_output=True, text=True, check=False
      ).stdout.strip()
    except OSError:
      return ""

  commit = git("rev-parse", "HEAD")
  if not commit:
    return "unknown"
  changes = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                ":(exclude)experiments/results")
  return commit + ("+dirty" if changes else "")


def cpu_model() -> str:
  """The host CPU's model name (lscpu), or what `platform` knows."""
  try:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
      if line.startswith("Model name:"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


# The vector extensions that set a CPU's matmul speed, as /proc/cpuinfo names them.
MATMUL_ISA = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_details() -> dict:
  """The CPU's family and model numbers and its MATMUL_ISA flags (Linux; else empty).

  lscpu's model name alone ("AMD EPYC") names machines whose matmul peaks
  differ by 2x; these tell them apart.
  """
  try:
    text = Path("/proc/cpuinfo").read_text()
  except OSError:
    return {}
  fields = {}
  for line in text.splitlines():
    if not line.strip():
      break  # the first processor's block is enough
    key, _, value = line.partition(":")
    fields[key.strip()] = value.strip()
  flags = set(fields.get("flags", "").split())
  return {"cpu_family": fields.get("cpu family"), "cpu_model_number": fields.get("model"),
          "cpu_isa": [flag for flag in MATMUL_ISA if flag in flags]}


def hardware() -> dict:
  """The first device's platform and kind, the device count and the CPU: model name,
  core count, the cores this process may run on, and `cpu_details`."""
  import jax  # deferred, as in `versions`

  device = jax.local_devices()[0]
  # A run pinned to fewer cores (taskset, a container's cpuset) is slower by as much.
  usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return {
      "platform": device.platform, "device_kind": device.device_kind,
      "local_devices": jax.local_device_count(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
      "cpus_usable": usable, **cpu_details(),
  }


def versions() -> dict:
  # Imported here, not at the top: commands that only need REPO or git_commit
  # (experiments.reproduce) then answer --help without loading JAX (4 s).
  import flax
  import jax
  import optax

  return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__}


def device_names() -> list[str]:
  """Every device of the run, all processes' (['cuda:0'], ['cpu:0', 'cpu:1'])."""
  import jax  # deferred, as in `versions`

  return [str(d) for d in jax.devices()]


def command_line(module: str) -> str:
  """This process's command as one would type it: `python -m MODULE FLAGS...`, quoted."""
  return shlex.join(["python", "-m", module, *sys.argv[1:]])


def header(module: str, commit: str, library_versions: dict | None = None) -> dict:
  """What every results file starts with: the command as typed, commit, hardware, versions.

  `commit` is read by the caller when it starts (what ran, whatever HEAD is at the end).
  """
  return {"command": command_line(module), "commit": commit,
          "hardware": hardware(), "versions": library_versions or versions()}


def write_json(path: Path, results: dict) -> None:
  """The results as indented JSON, written atomically (its folder made if need be)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  atomic_write(path, json.dumps(results, indent=2) + "\n")


OUTPUT_EXTENSIONS = (".json", ".md", ".png")  # what the scripts write under a prefix


def output_prefix(value: str) -> Path:
  """An --output PREFIX of PREFIX.json, .md, ...: refused in one line, before any work,
  if empty, a folder, in a folder that cannot be written, if one of its outputs is a
  folder, or if one would take a run's own file name (results.json, ...) in a run's
  directory."""
  if not value.strip() or value.endswith(os.sep):
    raise UserError(f"--output={value!r} must be a file prefix, e.g. experiments/results/NAME")
  prefix = output_file(value, "a file prefix")
  # A folder in the way of one output would fail the command after the work, with the
  # other outputs already written.
  for extension in OUTPUT_EXTENSIONS:
    output = with_extension(prefix, extension)
    if output.is_dir():
      raise UserError(f"--output={value}: {output} is a folder")
    check_not_a_run_file(value, output, "prefix")
  return prefix


def check_not_a_run_file(value: str, output: Path, what: str) -> None:
  """Refuses --output=`value` if its `output` would be a run's own file (results.json, ...)
  in a run's directory; `what` --output names (a "prefix", a "file"), for the message."""
  if output.name in RUN_DIRECTORY_LAYOUT and output.exists():  # PREFIX = RUN/config
    raise UserError(f"--output={value} would replace {output}, a run's own file; name "
                    f"another {what}")
  # RUN/results.json written by an analysis made a run still training read as finished.
  if output.name in RUN_DIRECTORY_LAYOUT and (output.parent / "config.json").is_file():
    raise UserError(f"--output={value} would write {output} into a run's directory, under "
                    f"the name of a run's own file; name another {what}")


def output_file(value: str, what: str) -> Path:
  """--output=`value`, a file or file prefix (`what`, for the message): refused in one
  line, before any work, if a folder or in a folder that cannot be written."""
  path = Path(value).expanduser()
  if path.is_dir() or value.endswith(os.sep):
    raise UserError(f"--output={value}: {path} is a folder; name {what} in it")
  check_writable_directory(path.parent, "the folder of --output")
  return path


def with_extension(prefix: Path, extension: str) -> Path:
  """PREFIX + extension: unlike Path.with_suffix, keeps a dot in the prefix (tau0.5)."""
  return prefix.parent / (prefix.name + extension)


def write_results(prefix: Path, results: dict, markdown: str) -> None:
  """PREFIX.json (the results) and PREFIX.md (their table), each written atomically."""
  write_json(with_extension(prefix, ".json"), results)
  atomic_write(with_extension(prefix, ".md"), markdown)


def record_launch(
    workdir: Path, command: str | None, resumed_step: int | None, epochs_done: int,
    num_params: int,
) -> None:
  """Appends one start of a training run to workdir/launches.jsonl.

  Each line: the command as typed (None when train_and_evaluate was called
  from Python), the commit, the host CPU (its name and `cpu_details`), the
  device kind, the devices (named as results.json names them), the library
  versions, the UTC time, the checkpoint step it resumed from (None for a
  fresh start), the epochs already done (a launch of a finished run only
  re-evaluates it) and the model's parameter count (so that a run still
  training can report it).
  """
  import jax  # deferred, as in `versions`

  launch = {
      "command": command, "commit": git_commit(), "host_cpu": cpu_model(),
      "host_cpu_details": cpu_details(), "device_kind": jax.local_devices()[0].device_kind,
      "devices": device_names(), "versions": versions(),
      "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      "resumed_step": resumed_step, "epochs_done": epochs_done, "num_params": num_params,
  }
  with open(workdir / "launches.jsonl", "a+b") as f:
    # A launch killed inside its write left a torn last line: this one would extend it
    # into one damaged line that the readers, once it is not the last, refuse.
    size = f.seek(0, os.SEEK_END)
    if size:
      f.seek(size - 1)
      if f.read(1) != b"\n":
        f.seek(0)
        content = f.read()
        f.truncate(content.rfind(b"\n") + 1)
    f.write((json.dumps(launch) + "\n").encode())
