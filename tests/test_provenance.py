"""tied_lm/provenance.py: which changes mark a run's commit dirty."""

import subprocess

from tied_lm import provenance


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
  (tmp_path / "experiments" / "results" / "run.json").write_text('{"new": 1}\n')
  assert provenance.git_commit() == head  # a harness rewrote its results
  (tmp_path / "code.py").write_text("x = 2\n")
  assert provenance.git_commit() == head + "+dirty"
  monkeypatch.setenv("TIED_LM_COMMIT", "abc")
  assert provenance.git_commit() == "abc"
