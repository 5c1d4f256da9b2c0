"""Test setup: two host CPU devices for the pmap tests, and the shared data."""

import os
from pathlib import Path

# Must happen before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
)
_SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if "TIED_LM_DATA_DIR" not in os.environ and _SHARED_DATA.is_dir():
  os.environ["TIED_LM_DATA_DIR"] = str(_SHARED_DATA)
