"""tied_lm/provenance.py: which changes mark a run's commit dirty; what it says of the CPU."""

import os
import platform
import subprocess

import pytest

from tied_lm import fileio, provenance
from tied_lm.errors import UserError


def test_only_changes_outside_the_results_mark_the_commit_dirty(tmp_path, monkeypatch):
  def git(*args):
    subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

  git("init", "-q")
  (tmp_path / "experiments" / "results").mkdir(parents=True)
  (tmp_path / "code.py").write_text("x = 1\n")
  (tmp_path / "experiments" / "results" / "run.json").write_text("{}\n")
  git("add", ".")
  git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init")
  monkeypatch.delenv("TIED_LM_COMMIT", raising=False)
  monkeypatch.setattr(provenance, "REPO", tmp_path)
  head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True,
                        text=True, check=True).stdout.strip()
  assert provenance.git_commit() == head
  (tmp_path / "notes.txt").write_text("untracked\n")  # run directories, notes: not the code
  assert provenance.git_commit() == head
  (tmp_path / "experiments" / "results" / "run.json").write_text('{"new": 1}\n')
  assert provenance.git_commit() == head  # a harness rewrote its results
  (tmp_path / "code.py").write_text("x = 2\n")
  assert provenance.git_commit() == head + "+dirty"
  monkeypatch.setenv("TIED_LM_COMMIT", "abc")
  assert provenance.git_commit() == "abc"


def test_hardware_names_the_cpu_family_and_its_matmul_extensions_as_lscpu_does():
  lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
  if "Flags:" not in lscpu:
    pytest.skip("no lscpu flags to check against")
  fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
  fields = {key.strip(): value.strip() for key, value in fields.items()}
  hardware = provenance.hardware()
  assert hardware["cpu_family"] == fields["CPU family"]
  assert hardware["cpu_model_number"] == fields["Model"]
  flags = set(fields["Flags"].split())
  assert hardware["cpu_isa"] == [f for f in provenance.MATMUL_ISA if f in flags]
  if platform.machine() == "x86_64":  # every x86 machine this project has run on has AVX2
    assert "avx2" in hardware["cpu_isa"]


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux and two usable cores")
def test_hardware_counts_the_cores_a_pinned_process_may_use():
  cores = os.sched_getaffinity(0)
  assert provenance.hardware()["cpus_usable"] == len(cores)
  os.sched_setaffinity(0, {min(cores)})  # as `taskset -c N` would
  try:
    hardware = provenance.hardware()
  finally:
    os.sched_setaffinity(0, cores)
  assert (hardware["cpus_usable"], hardware["cpu_count"]) == (1, os.cpu_count())


def test_output_prefixes_keep_their_dots_and_bad_ones_are_refused(tmp_path):
  prefix = provenance.output_prefix(str(tmp_path / "sharpness_tau0.5"))
  assert provenance.with_extension(prefix, ".json") == tmp_path / "sharpness_tau0.5.json"
  provenance.write_results(prefix, {"x": 1}, "| x |\n")
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "sharpness_tau0.5.json", "sharpness_tau0.5.md"]
  (tmp_path / "taken.md").mkdir()  # PREFIX.json would be written, then PREFIX.md fail
  for bad, message in (("", "must be a file prefix"), (f"{tmp_path}/", "must be a file prefix"),
                       (str(tmp_path), "is a folder"),
                       (str(tmp_path / "taken"), r"taken.md is a folder")):
    with pytest.raises(UserError, match=message):
      provenance.output_prefix(bad)
  assert not (tmp_path / "taken.json").exists()
  # target_sharpness --output=RUN/config replaced the run's config.json, exit 0.
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "config.json").write_text("{}")
  with pytest.raises(UserError, match=(
      f"^--output={tmp_path / 'run' / 'config'} would replace {tmp_path / 'run' / 'config.json'}, "
      "a run's own file; name another prefix$")):
    provenance.output_prefix(str(tmp_path / "run" / "config"))
  # RUN/results.json, absent while the run trains, made it read as finished.
  with pytest.raises(UserError, match=(
      f"^--output={tmp_path / 'run' / 'results'} would write {tmp_path / 'run' / 'results.json'} "
      "into a run's directory, under the name of a run's own file; name another prefix$")):
    provenance.output_prefix(str(tmp_path / "run" / "results"))
  assert provenance.output_prefix(str(tmp_path / "run" / "sharpness")) == tmp_path / "run/sharpness"
  assert provenance.output_prefix(str(tmp_path / "results")) == tmp_path / "results"  # no run
  # A JSON file's path ending in a separator names a folder, not a file called so.
  with pytest.raises(UserError, match="is a folder; name a JSON file in it"):
    provenance.output_file(f"{tmp_path}/new/", "a JSON file")


def test_a_launch_after_a_torn_last_line_replaces_it_and_the_file_stays_readable(tmp_path):
  # A launch killed mid-write left '{"command": "trunc'; the next one was written onto it,
  # and once another followed, the readers refused the file as damaged.
  provenance.record_launch(tmp_path, "first", None, 0, 10)
  launches = tmp_path / "launches.jsonl"
  with open(launches, "a") as f:
    f.write('{"command": "trunc')
  provenance.record_launch(tmp_path, "second", 5, 1, 10)
  provenance.record_launch(tmp_path, "third", 9, 2, 10)
  records = fileio.read_json_lines(launches, appended=True)
  assert [r["command"] for r in records] == ["first", "second", "third"]
  assert launches.read_text().count("\n") == 3 and "trunc" not in launches.read_text()
