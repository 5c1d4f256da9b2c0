"""hostmem: with its malloc settings, a jitted function's big buffers stop page-faulting."""

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tied_lm import hostmem

REPO = Path(__file__).resolve().parents[1]

# A jitted function over a 160 MB input, whose XLA:CPU temporaries take about
# 13,000 fresh pages per call under glibc's defaults (measured on x86_64). Run in
# a fresh process, it prints the settings applied and the minor page faults per
# call after warm-up.
_FAULTS_PER_CALL = """
import resource, sys
from tied_lm import hostmem
settings = hostmem.reuse_freed_memory() if sys.argv[1] == "reuse" else {}
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.tanh(jnp.exp(x) * 2.0).sum(axis=0))
x = jnp.full([4000, 10000], 0.1)
for _ in range(3):
  f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  f(x).block_until_ready()
print(settings, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="needs glibc")


def faults_per_call(mode: str) -> tuple[str, float]:
  environment = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  output = subprocess.run(
      [sys.executable, "-c", _FAULTS_PER_CALL, mode], env=environment,
      capture_output=True, text=True, check=True,
  ).stdout.split()
  return " ".join(output[:-1]), float(output[-1])


@glibc_only
def test_reused_buffers_no_longer_page_fault():
  settings, default_faults = faults_per_call("default")
  # The control: under glibc's defaults the freed temporaries are unmapped and
  # faulted in again at every call.
  assert default_faults > 5000
  settings, reuse_faults = faults_per_call("reuse")
  assert settings == str(hostmem.SETTINGS)
  assert reuse_faults < 200


@glibc_only
def test_a_users_own_malloc_tunables_are_left_alone(monkeypatch):
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=4")
  assert hostmem.reuse_freed_memory() == {}


def test_total_bytes_is_the_container_cap_where_it_is_lower(tmp_path, monkeypatch):
  # In a capped container the host's RAM overstates what the process may use.
  physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
  monkeypatch.setattr(hostmem, "_CGROUP_LIMITS", (v2, v1))
  assert hostmem.total_bytes() == physical  # neither file
  v2.write_text("max\n")
  v1.write_text("9223372036854771712\n")  # v1's "no cap"
  assert hostmem.total_bytes() == physical
  v1.write_text("1073741824\n")
  assert hostmem.total_bytes() == 2**30
  v2.write_text(f"{2**29}\n")
  assert hostmem.total_bytes() == 2**29
  monkeypatch.delattr(hostmem.os, "sysconf")  # Windows has none: no limit is known
  assert hostmem.total_bytes() is None


# Runs a command's module in a fresh process; at exit, glibc prints each malloc arena's
# statistics to stderr.
_WITH_MALLOC_STATS = """
import atexit, ctypes, runpy, sys
atexit.register(ctypes.CDLL("libc.so.6").malloc_stats)
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


@glibc_only
@pytest.mark.parametrize("command", ["tied_lm.main", "tied_lm.evaluate",
                                     "experiments.benchmark", "experiments.profile_step"])
def test_the_commands_keep_every_thread_in_one_malloc_arena(command, trained_run, tmp_path):
  # reuse_freed_memory must run before the first computation: a thread keeps the arena of
  # its first malloc. Called late, or not at all, XLA's threads had an arena each (16 on
  # 2 cores), and none reused the step buffers freed in the others.
  workdir = tmp_path / "run"
  if command == "tied_lm.main":
    args = [f"--workdir={workdir}", "--config=configs/default.py", "--config.num_epochs=1",
            "--config.max_steps_per_epoch=2"]
  elif command == "tied_lm.evaluate":
    shutil.copytree(trained_run[0], workdir)  # it writes its score into the run
    args = [f"--workdir={workdir}"]
  else:  # the timings, as short as they go
    args = ["--configs=configs/default.py", "--repeats=2", "--steps_per_repeat=2",
            "--warmup=0", "--matmul_size=256", f"--output={tmp_path / 'timing.json'}"]
  environment = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  result = subprocess.run([sys.executable, "-c", _WITH_MALLOC_STATS, command, *args],
                          cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert re.findall(r"^Arena \d+:", result.stderr, re.MULTILINE) == ["Arena 0:"]
