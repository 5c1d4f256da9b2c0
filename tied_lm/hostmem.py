"""Host memory: how much there is, and glibc malloc settings under which XLA:CPU reuses its
step buffers.

XLA:CPU allocates each step's temporaries with malloc from its worker threads.
glibc gives such a thread its own arena, whose heaps are at most 64 MB, so a
larger block falls back to mmap and is unmapped again when freed: every step
then page-faults its temporaries in anew (42,092 minor faults per medium step
on a 2-core AMD EPYC: `minor_faults_per_step` in
experiments/results/benchmark_cpu_amd_glibc_defaults.json). With one arena, no mmap
and no trimming, freed blocks stay in the process and the next step reuses
them. The numbers computed do not change; the process keeps its peak heap.
"""

import ctypes
import os
import platform
from pathlib import Path

# A container's memory cap: cgroup v2, then v1 ("max" or a huge number when uncapped).
_CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"),
                  Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


def total_bytes() -> int | None:
  """The memory this process may use at most: the host's RAM, or its container's cap if lower.

  None where the system does not say (no sysconf, as on Windows).
  """
  try:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (AttributeError, ValueError, OSError):
    return None
  for path in _CGROUP_LIMITS:
    try:
      text = path.read_text().strip()
    except OSError:
      continue
    if text.isdigit():
      total = min(total, int(text))
  return total


# From glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

SETTINGS = {"arena_max": 1, "mmap_max": 0, "trim_threshold": 2**31 - 1}
"""What `reuse_freed_memory` sets, by glibc tunable name (`glibc.malloc.*`)."""


def reuse_freed_memory() -> dict[str, int]:
  """Sets `SETTINGS` with mallopt, unless the user chose malloc settings.

  Call it before the first JAX computation: a thread keeps the arena it got at
  its first malloc. Leaves malloc alone where the C library is not glibc, or
  where GLIBC_TUNABLES already sets a `glibc.malloc` tunable (the way to opt
  out: e.g. GLIBC_TUNABLES=glibc.malloc.arena_max=8).

  Returns:
    The settings applied; empty where none were.
  """
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return {}
  if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
    return {}
  mallopt = ctypes.CDLL("libc.so.6").mallopt
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  options = {"arena_max": _M_ARENA_MAX, "mmap_max": _M_MMAP_MAX,
             "trim_threshold": _M_TRIM_THRESHOLD}
  applied = {name: value for name, value in SETTINGS.items() if mallopt(options[name], value)}
  return applied
