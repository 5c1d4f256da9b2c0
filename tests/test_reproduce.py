"""experiments/reproduce.py: the grid's commands, the table, and a tiny grid end to end."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from experiments import reproduce
from tied_lm import provenance
from tied_lm.errors import UserError

# Evaluation unrolls num_steps in full: 5 (not small's 35) compiles in a fraction of the time.
TINY = ["model.embed_dim=16", "model.hidden_size=16", "num_steps=5", "num_epochs=1",
        "max_steps_per_epoch=5", "eval_batch_size=400"]


@pytest.mark.parametrize("module", ["experiments.reproduce", "tied_lm.summarize"])
def test_help_answers_without_importing_jax_or_torch(module, modules_imported_by):
  # These commands launch or read runs and never compute: their --help should
  # not wait for JAX (about 4 s) or tensorboardX's torch import.
  status, imported = modules_imported_by(module, "--help")
  assert status == 0
  assert "absl.flags" in imported
  assert not imported & {"jax", "torch", "tensorboardX"}


def test_train_command_passes_overrides_as_config_flags(tmp_path):
  command = reproduce.train_command("ptb", "medium", "real", tmp_path, ["model.unroll=5"])
  assert command[1:] == ["-m", "tied_lm.main", "--config=configs/ptb.py:medium,real",
                         f"--workdir={tmp_path}", "--config.model.unroll=5"]
  with pytest.raises(UserError, match="KEY=VALUE"):
    reproduce.train_command("ptb", "small", "vd", tmp_path, ["model.unroll"])


def test_run_all_tells_a_stopped_run_from_a_failed_one(tmp_path, capsys):
  def exiting(status: int) -> list[str]:
    return [sys.executable, "-c", f"import sys; sys.exit({status})"]
  commands = [(tmp_path / "done", exiting(0)), (tmp_path / "stopped", exiting(128 + 15)),
              (tmp_path / "failed", exiting(1))]
  unfinished, stopped_by = reproduce.run_all(commands, parallel=3)
  assert sorted(unfinished) == [tmp_path / "failed", tmp_path / "stopped"]
  assert stopped_by is None  # a run's own exit status is not a signal to the harness
  out = capsys.readouterr().out
  assert "done  done in" in out
  assert "stop  stopped by SIGTERM after" in out and "resumes from its checkpoint" in out
  assert "FAIL  failed (exit 1 after" in out and "stopped (exit" not in out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_to_run_all_reaches_each_running_command_once_and_starts_no_more(
    tmp_path, capsys, signum, set_signal_handler
):
  # A command that records the signals it gets and its session, then exits as
  # tied_lm.main does after its checkpoint (128 + the signal), a second after the first.
  child = (
      "import os, signal, sys, time\n"
      "log = open(sys.argv[1], 'a')\n"
      "got = []\n"
      "for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):\n"
      "  signal.signal(s, lambda s, f: got.append((s, time.time())))\n"
      "log.write(f'session {os.getsid(0)}\\n'); log.flush()\n"
      "deadline = time.time() + 60\n"
      "while time.time() < deadline and not (got and time.time() > got[0][1] + 1):\n"
      "  time.sleep(0.05)\n"
      "log.write(f'signals {[int(s) for s, _ in got]}\\n')\n"
      "sys.exit(128 + got[0][0] if got else 0)\n"
  )
  record = tmp_path / "record.txt"
  commands = [(tmp_path / "first", [sys.executable, "-c", child, str(record)]),
              (tmp_path / "second", [sys.executable, "-c", child, str(record)])]

  def signal_when_started():
    while "session" not in (record.read_text() if record.exists() else ""):
      time.sleep(0.05)
    os.kill(os.getpid(), signum)

  set_signal_handler(signum, lambda *_: None)  # run_all installs its own
  threading.Thread(target=signal_when_started, daemon=True).start()
  unfinished, stopped_by = reproduce.run_all(commands, parallel=1)
  assert unfinished == [tmp_path / "first", tmp_path / "second"]
  assert stopped_by == signum  # main exits 128 + it, as tied_lm.main does
  session, signals = record.read_text().splitlines()
  # In a session of its own, a signal to our process group would not reach it as well.
  assert session.startswith("session ") and int(session.split()[1]) != os.getsid(0)
  assert signals == f"signals {[int(signum)]}"
  out = capsys.readouterr().out
  assert f"stop  first by {signum.name}" in out
  assert f"skip  second: not started after {signal.Signals(signum).name}" in out
  assert not (tmp_path / "second").exists()


def test_run_all_leaves_an_ignored_hangup_ignored(tmp_path, capsys, set_signal_handler):
  # Under nohup SIGHUP is ignored: closing the terminal must not stop the runs.
  started = tmp_path / "started"
  command = [sys.executable, "-c",
             f"import time; open({str(started)!r}, 'w').close(); time.sleep(1)"]

  def hang_up_when_started():
    while not started.exists():
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGHUP)

  set_signal_handler(signal.SIGHUP, signal.SIG_IGN)
  threading.Thread(target=hang_up_when_started, daemon=True).start()
  assert reproduce.run_all([(tmp_path / "run", command)], parallel=1) == ([], None)
  assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
  assert "done  run in" in capsys.readouterr().out


def test_sweep_points_take_every_combination_with_a_tag_each():
  points = reproduce.sweep_points(["loss.tau=5,10", "loss.gamma=0.5"])
  assert points == [("tau5_gamma0.5", ["loss.tau=5", "loss.gamma=0.5"]),
                    ("tau10_gamma0.5", ["loss.tau=10", "loss.gamma=0.5"])]
  assert reproduce.sweep_points([]) == [("", [])]
  assert reproduce.run_name("ptb", "small", "real", "tau5") == "ptb_small_real_tau5"
  with pytest.raises(UserError, match="KEY=V1,V2"):
    reproduce.sweep_points(["loss.tau"])


def test_parse_run_name_inverts_run_name_and_skips_other_files():
  for tag in ("", "tau5", "output_biasTrue_gamma0.3"):
    name = reproduce.run_name("wikitext2", "medium", "real", tag)
    assert reproduce.parse_run_name(name) == (("wikitext2", "medium", "real"), tag)
  for other in ("benchmark_cpu_intel", "ptb_small", "ptb", "ptb_tiny_al", "predictions"):
    assert reproduce.parse_run_name(other) is None


def test_sweep_table_ranks_each_model_by_validation_with_its_untagged_run():
  swept = {"ptb_small_real_tau5": _report(95.0, 91.0), "ptb_small_real_tau20": _report(93.0, 90.0),
           "ptb_small_al_tau5": _report(99.0, 94.0, valid_perplexity_batch1=98.94,
                                        test_perplexity_batch1=93.96)}
  reports = {("ptb", "small", "real"): _report(94.0, 90.5),
             ("ptb", "small", "vd"): _report(92.0, 88.0)}  # no sweep of vd: not listed
  rows = [line.split("|") for line in reproduce.sweep_table(swept, reports).splitlines()
          if line.startswith("| ptb")]
  assert [(row[1].strip(), row[2].strip()) for row in rows] == [
      ("ptb_small_al_tau5", "99.00 (58)"), ("ptb_small_real_tau20", "93.00 (58)"),
      ("ptb_small_real", "94.00 (58)"), ("ptb_small_real_tau5", "95.00 (58)")]
  assert [row[4].strip() for row in rows] == ["98.94 / 93.96", "-", "-", "-"]  # batch 1


def _report(valid, test, seed=0, **extra):
  return {"dataset": "ptb", "variant": "real", "valid_perplexity": valid,
          "test_perplexity": test, "eval_batch_size": 10,
          "num_params": 13.3e6, "epochs": 60, "best_epoch": 58, "config": {"seed": seed},
          "hardware": {"device_kind": "cpu"}, "wall_seconds": 75.0, **extra}


def test_chosen_on_validation_takes_the_best_finished_run_at_the_default_seed():
  reports = {("ptb", "small", "vd"): _report(92.0, 88.0),
             ("ptb", "small", "real"): _report(94.0, 90.5),
             ("ptb", "small", "al"): _report(90.0, 86.0)}
  swept = {"ptb_small_real_dropout0.2": _report(86.5, 82.7),
           "ptb_small_real_tau5": _report(93.0, 89.0),
           "ptb_small_real_seed1": _report(85.0, 81.0, seed=1),  # a seed is not a setting
           "ptb_small_real_dropout0.2_seed2": _report(87.5, 83.7, seed=2),
           "ptb_small_real_dropout0.2_seed1": _report(88.0, None, seed=1),  # still training
           "ptb_small_vd_seed1": _report(93.0, 88.4, seed=1),
           "ptb_small_vd_dropout0.2": _report(80.0, None),  # still training: no test yet
           "ptb_small_re_output_biasTrue": _report(91.0, 86.5),  # no untagged run
           "ptb_small_al_tau5": _report(90.5, 85.0)}  # better on test only: not chosen
  chosen = reproduce.chosen_on_validation(reports, swept)
  assert {key: tag for key, (tag, _) in chosen.items()} == {
      ("ptb", "small", "vd"): "", ("ptb", "small", "al"): "",
      ("ptb", "small", "real"): "dropout0.2", ("ptb", "small", "re"): "output_biasTrue"}
  ptb = reproduce.table(reports, "ROOT", chosen=chosen, swept=swept).split("## wikitext2")[0]
  cells = {tuple(c.strip() for c in line.split("|")[1:3]): line.split("|")[-2].strip()
           for line in ptb.splitlines() if line.startswith("| ")}
  # The mean over the chosen settings' finished seeds: seed 1 of the paper settings is not one.
  assert cells[("small", "REAL")] == ("86.5 / 82.7 ([dropout0.2](ptb_small_real_dropout0.2.json))"
                                      "; seeds 0, 2: mean 87.0 / 83.2")
  assert cells[("small", "VD")] == ("92.0 / 88.0 ([paper settings](ptb_small_vd.json))"
                                    "; seeds 0, 1: mean 92.5 / 88.2")
  assert cells[("small", "AL")] == "90.0 / 86.0 ([paper settings](ptb_small_al.json))"
  assert cells[("small", "RE")].startswith("91.0 / 86.5 ([output_biasTrue]")  # a "not run" row
  assert cells[("medium", "VD")] == "-"


def test_table_puts_ours_beside_the_paper_and_says_what_was_not_run():
  reports = {("ptb", "medium", "real"): _report(78.61, 75.92, valid_perplexity_batch1=78.0,
                                                test_perplexity_batch1=75.5)}
  text = reproduce.table(reports, "ROOT", notes="Why it misses.")
  ptb = text.split("## wikitext2")[0]
  rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in ptb.splitlines()
          if line.startswith("| ")}
  real = rows[("medium", "REAL")]
  assert "75.7 / 73.2" in real and "78.6 / 75.9" in real and "78.0 / 75.5" in real
  assert "13.3M (14M)" in real and "60 (58)" in real
  assert ("python -m experiments.reproduce --root=ROOT --datasets=ptb --sizes=small "
          "--variants=vd --rescore") in rows[("small", "VD")]
  assert "wikitext2" in text and text.rstrip().endswith("Why it misses.")


def test_table_names_a_cpu_a_changed_size_and_only_the_paper_count_of_a_missing_run():
  cpu = {"device_kind": "cpu", "host_cpu": "AMD EPYC"}
  reports = {("ptb", "small", "vd"): _report(92.0, 88.0, size="16 units", hardware=cpu),
             ("ptb", "medium", "real"): _report(78.6, 75.9, size="medium")}
  swept = {"ptb_small_re_hidden_size650": _report(80.0, 76.0, size="medium")}
  chosen = reproduce.chosen_on_validation(reports, swept)
  ptb = reproduce.table(reports, "ROOT", chosen=chosen, swept=swept).split("## wikitext2")[0]
  rows = {tuple(c.strip() for c in line.split("|")[1:3]): [c.strip() for c in line.split("|")]
          for line in ptb.splitlines() if line.startswith("| ")}
  assert rows[("small", "VD")][4] == "92.0 / 88.0 (16 units)"
  assert rows[("small", "VD")][9] == "AMD EPYC (CPU)"
  assert rows[("medium", "REAL")][4] == "78.6 / 75.9"  # its own size: no note
  assert rows[("medium", "REAL")][9] == "cpu"  # an older report without host_cpu
  assert rows[("small", "RE")][11].startswith("80.0 / 76.0 (medium) ([hidden_size650]")
  assert rows[("large", "VD")][7] == "- (66M)" and rows[("large", "AL")][7] == "-"
  sweep = reproduce.sweep_table(swept, reports)
  assert "| ptb_small_re_hidden_size650 | 80.00 (58) | 76.00 | - | 60 | cpu | 1m15s |" in sweep


def test_reports_without_a_run_directory_come_from_the_json_files(tmp_path, capsys):
  results_dir = tmp_path / "results"
  results_dir.mkdir()
  report = _report(86.47, 82.67, curve=[{"epoch": 1, "valid_perplexity": 198.0}])
  (results_dir / "ptb_small_real.json").write_text(json.dumps(report))
  reproduce.write_reports(tmp_path / "deleted_runs", results_dir)
  assert capsys.readouterr().out.startswith(f"no run directory {tmp_path / 'deleted_runs'}: ")
  table = (results_dir / "TABLE.md").read_text()
  assert "| small | REAL | 86.3 / 82.7 | 86.5 / 82.7 |" in table
  assert not (tmp_path / "deleted_runs").exists()


@pytest.fixture
def harness(run_module):
  return lambda *args: run_module("experiments.reproduce", *args, timeout=None)


def test_a_tiny_grid_trains_in_parallel_reports_and_is_not_retrained(tmp_path, harness):
  root, results_dir = tmp_path / "runs", tmp_path / "results"
  args = [f"--root={root}", f"--results_dir={results_dir}", "--sizes=small",
          "--variants=vd,real", "--parallel=2", *(f"--set={s}" for s in TINY)]
  first = harness(*args)
  assert first.returncode == 0, first.stdout + first.stderr
  assert first.stdout.count("start ") == 2 and first.stdout.count("done ") == 2
  for variant in ("vd", "real"):
    results = json.loads((root / f"ptb_small_{variant}" / "results.json").read_text())
    report = json.loads((results_dir / f"ptb_small_{variant}.json").read_text())
    assert report["variant"] == variant
    assert report["test_perplexity"] == results["test_perplexity"]
    assert report["test_tokens_scored"] == 82429 and report["valid_tokens_scored"] == 73759
    assert report["commands"][0]["command"].startswith(
        f"python -m tied_lm.main --config=configs/ptb.py:small,{variant}")
    assert [c["epoch"] for c in report["curve"]] == [1]
  table = (results_dir / "TABLE.md").read_text()
  assert "| small | VD | 92.6 / 87.3 |" in table and "| small | REAL | 86.3 / 82.7 |" in table
  assert (results_dir / "curves_ptb_small.png").stat().st_size > 0

  again = harness(*args)  # finished runs are skipped
  assert again.returncode == 0 and "start " not in again.stdout


def test_bad_grid_is_a_one_line_error(tmp_path, harness):
  result = harness(f"--root={tmp_path}", "--variants=vd,tied")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      "error: --variants: unknown tied; choose from vd, al, re, real")


@pytest.mark.parametrize("args,message", [
    (["--variants=vd,real,vd"], "the grid names ptb_small_vd more than once: a value is "
     "repeated in --datasets, --sizes, --variants or a --sweep"),
    (["--variants=al", "--sweep=loss.tau=5,5"], "the grid names ptb_small_al_tau5 more than "
     "once"),
    (["--root="], "flag --root=: is empty: name a directory"),
    (["--results_dir= "], "flag --results_dir= : is empty: name a directory"),
    (["--results_dir={file}"], "cannot write --results_dir {file}: {file} is not a directory"),
    (["--root={file}/runs"], "cannot write --root {file}/runs: {file} is not a directory"),
    (["--root={file}", "--train=false"], "--root={file} is a file, not a directory of runs"),
    # An empty --sizes trained nothing and rewrote TABLE.md as "not run" throughout.
    (["--sizes="], "flag --sizes=[]: needs at least one value"),
    (["--variants=vd,,al"], "flag --variants=['vd', '', 'al']: has an empty entry (two commas"),
    # Each run's config, checked before the first run starts.
    (["--variants=vd,real", "--set=model.unroll=5", "--set=loss.tua=5"],
     "ptb_small_vd: unknown config field in --set=loss.tua"),
    (["--variants=vd", "--set=model.unroll=5", "--sweep=losss.tau=5"],
     'ptb_small_vd_tau5: unknown config field in --sweep=losss.tau; Did you mean "loss" '
     'instead of "losss"?'),
    # Through a field that is not a section: ml_collections names no key.
    (["--variants=vd", "--set=loss.tau.x=1"],
     "ptb_small_vd: unknown config field in --set=loss.tau.x"),
    (["--variants=vd,real", "--sweep=loss.tau=5,abc"],
     "ptb_small_vd_tauabc: flag --config.loss.tau=abc: could not convert string to float"),
    (["--variants=vd,real", "--sweep=optim.learning_rate=1,-1"],
     "ptb_small_vd_learning_rate-1: optim.learning_rate=-1.0 must be > 0"),
    # Another model than the name: trained for hours, then skipped by the reports.
    (["--variants=real", "--set=loss.augmented=False"],
     "ptb_small_real: --set/--sweep make it a ptb re run, not the ptb real its name says"),
    (["--variants=real", "--sweep=model.tie_embeddings=False"],
     "ptb_small_real_tie_embeddingsFalse: --set/--sweep make it a ptb al-bias run, not the "
     "ptb real its name says"),
    (["--variants=vd", "--set=dataset=wikitext2"],
     "ptb_small_vd: --set/--sweep make it a wikitext2 vd run, not the ptb vd its name says"),
    # The tag names a folder: data_dir=/a/b made ROOT/ptb_small_vd_data_dir/a/b.
    (["--sweep=data_dir={file}"], "--sweep 'data_dir={file}': a value with '/' cannot be "
     "part of a run's folder name; give it with --set instead"),
])
def test_bad_directories_and_repeated_runs_are_one_line_before_any_run(
    tmp_path, harness, args, message):
  file = tmp_path / "file"
  file.write_text("")
  defaults = [f"--root={tmp_path / 'runs'}", f"--results_dir={tmp_path / 'results'}",
              "--sizes=small", "--variants=vd"]
  result = harness(*defaults, *(a.format(file=file) for a in args))
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith(f"error: {message.format(file=file)}")
  assert "start " not in result.stdout and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("in_the_way,message", [
    ("ptb_small_real", "{root}/ptb_small_real is a file, where the run's folder goes: move it "
     "away"),
    ("ptb_small_real/train.log/", "{root}/ptb_small_real/train.log is a folder, where the run's "
     "log goes: move it away"),
    ("ptb_small_real/checkpoints", "{root}/ptb_small_real/checkpoints is a file, where a run "
     "keeps its folder checkpoints: move it away or use another --workdir"),
    ("config.json", "--root={root} is a run's directory (it has config.json): give the folder "
     "that holds the runs"),
    # An epoch done and its checkpoints deleted: tied_lm.main refused it after the other runs.
    ("ptb_small_real/metrics.jsonl", "{root}/ptb_small_real holds a trained run (epoch records "
     "in metrics.jsonl) but no checkpoint to resume from: training from scratch would replace "
     "its results. Move them away, or use a new --workdir"),
])
def test_something_in_the_way_of_a_run_is_one_line_before_any_run(
    tmp_path, harness, in_the_way, message):
  # The first two were tracebacks once the runs before them had started (FileExistsError,
  # IsADirectoryError); the third failed its run after the others had trained; a run's
  # directory as --root trained the grid inside it.
  root = tmp_path / "runs"
  path = root / in_the_way
  path.parent.mkdir(parents=True)
  path.mkdir() if in_the_way.endswith("/") else path.write_text(
      '{"kind": "epoch", "epoch": 1}\n' if path.name == "metrics.jsonl" else "")
  result = harness(f"--root={root}", f"--results_dir={tmp_path / 'results'}", "--sizes=small",
                   "--variants=vd,real", *(f"--set={s}" for s in TINY))
  assert (result.returncode, result.stderr.strip().splitlines()[-1]) == (
      2, f"error: {message.format(root=root)}")
  assert "start " not in result.stdout and not (root / "ptb_small_vd").exists()


def test_a_damaged_run_is_skipped_and_a_report_file_of_another_kind_refused(
    trained_run, tmp_path, capsys):
  # The first stopped the reports with the other runs' files half written; the second was
  # an AttributeError traceback.
  root, results_dir = tmp_path / "runs", tmp_path / "results"
  shutil.copytree(trained_run[0], root / "ptb_small_real")
  shutil.copytree(trained_run[0], root / "ptb_small_real_seed1")
  metrics = root / "ptb_small_real" / "metrics.jsonl"
  metrics.write_text(metrics.read_text()[:-40])  # a truncated last line
  results_dir.mkdir()
  reproduce.write_reports(root, results_dir)
  assert capsys.readouterr().err.startswith(f"skipped {root / 'ptb_small_real'}: {metrics}")
  assert sorted(p.name for p in results_dir.glob("*.json")) == ["ptb_small_real_seed1.json"]
  (results_dir / "ptb_small_al.json").write_text('{"dataset": "ptb", "variant": "al"}\n')
  with pytest.raises(UserError, match=re.escape(
      f"{results_dir / 'ptb_small_al.json'} is not a run report (no valid_perplexity, "
      "test_perplexity, eval_batch_size, epochs, best_epoch, num_params, wall_seconds, config, "
      "hardware, curve): move it away, or write it again from its run with --root")):
    reproduce.write_reports(root, results_dir)
  report = json.loads((results_dir / "ptb_small_real_seed1.json").read_text())
  (results_dir / "ptb_small_al.json").write_text(json.dumps({**report, "config": {}}))
  with pytest.raises(UserError, match=re.escape("ptb_small_al.json is not a run report (no "
                                                "config.seed): move it away")):
    reproduce.write_reports(root, results_dir)
  (results_dir / "ptb_small_al.json").write_text("[]\n")
  with pytest.raises(UserError, match=re.escape(
      f"{results_dir / 'ptb_small_al.json'} is damaged: a JSON list, not an object; restore "
      "or remove it")):
    reproduce.write_reports(root, results_dir)
  # Values of the wrong kind were a ValueError, TypeError or KeyError from the tables.
  for edit, problem in (
      ({"test_perplexity": "x"}, "test_perplexity='x' is not a number or null"),
      ({"wall_seconds": None}, "wall_seconds=None is not a number"),
      ({"epochs": 2.5}, "epochs=2.5 is not a whole number"),
      ({"curve": [{"epoch": 1}]}, "its curve is not a list of epochs with their "
       "valid_perplexity")):
    (results_dir / "ptb_small_al.json").write_text(json.dumps({**report, **edit}))
    with pytest.raises(UserError, match=re.escape(
        f"ptb_small_al.json is not a run report ({problem}): move it away")):
      reproduce.write_reports(root, results_dir)
  # A damaged report of a run at hand is written again from the run, not refused (nor,
  # with a value of the wrong kind, kept as "a finished run's report" or compared).
  (results_dir / "ptb_small_al.json").unlink()
  for damaged in ('{"dataset": ', json.dumps({**report, "complete": True, "epochs": 2.5}),
                  json.dumps({**report, "complete": False, "epochs": "3"})):
    (results_dir / "ptb_small_real_seed1.json").write_text(damaged)
    reproduce.write_reports(root, results_dir)
    assert json.loads((results_dir / "ptb_small_real_seed1.json").read_text()) == report
    assert "replacing " + str(results_dir / "ptb_small_real_seed1.json") in (
        capsys.readouterr().err)


def test_the_report_is_written_when_a_run_fails_and_then_the_failure_is_named(tmp_path, harness):
  root, results_dir = tmp_path / "runs", tmp_path / "results"
  results_dir.mkdir()
  report = _report(86.47, 82.67, curve=[])  # a report whose run has no records: no curve
  (results_dir / "ptb_small_real.json").write_text(json.dumps(report))
  result = harness(f"--root={root}", f"--results_dir={results_dir}", "--sizes=small",
                   "--variants=vd", "--set=eval_batch_size=1000000", "--rescore")
  assert result.returncode == 2
  assert "FAIL  ptb_small_vd (exit 2" in result.stdout
  # The run's own one-line reason, not only where its log is (a problem only the corpus
  # shows, which the harness's own check of the configs cannot see).
  assert ("): error: eval_batch_size=1000000 exceeds the 73,759 targets of the valid split: "
          "each row needs at least one; see ") in result.stdout
  assert "| small | REAL | 86.3 / 82.7 | 86.5 / 82.7 |" in (results_dir / "TABLE.md").read_text()
  assert result.stderr.strip().splitlines()[-1] == "error: 1 run(s) did not finish: ptb_small_vd"


def test_a_batch1_score_of_an_older_checkpoint_is_not_current(tmp_path):
  for step in (10, 20):
    (tmp_path / "checkpoints" / str(step)).mkdir(parents=True)
  score = tmp_path / "eval_valid_batch1.json"
  score.write_text(json.dumps({"perplexity": 90.0, "tokens_scored": 5, "checkpoint_step": 10}))
  assert reproduce.current_batch1(tmp_path, "valid") is None  # trained on since
  assert reproduce.current_batch1(tmp_path, "test") is None  # never scored
  score.write_text(json.dumps({"perplexity": 89.0, "tokens_scored": 5, "checkpoint_step": 20}))
  assert reproduce.current_batch1(tmp_path, "valid")["perplexity"] == 89.0
  score.write_text(json.dumps({"perplexity": 88.0, "tokens_scored": 5}))  # older files
  assert reproduce.current_batch1(tmp_path, "valid")["perplexity"] == 88.0


def test_a_report_carries_each_batch1_score_with_the_commit_that_scored_it(
    trained_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(trained_run[0], workdir)
  (workdir / "eval_valid_batch1.json").write_text(json.dumps(
      {"perplexity": 89.0, "tokens_scored": 5, "commit": "abc1234"}))
  (workdir / "eval_test_batch1.json").write_text(json.dumps(
      {"perplexity": 85.0, "tokens_scored": 6}))  # written before scores recorded a commit
  report = reproduce.run_report(workdir)
  assert [report[f"valid_{key}"] for key in ("perplexity_batch1", "tokens_scored_batch1",
                                             "batch1_commit")] == [89.0, 5, "abc1234"]
  assert [report[f"test_{key}"] for key in ("perplexity_batch1", "tokens_scored_batch1",
                                            "batch1_commit")] == [85.0, 6, None]


def test_a_report_credits_the_launch_that_trained_not_a_later_reevaluation(
    trained_run, tmp_path, monkeypatch):
  from configs import default
  from tied_lm import train

  workdir = tmp_path / "run"
  shutil.copytree(trained_run[0], workdir)
  config = default.get_config()
  config.num_epochs, config.max_steps_per_epoch = 1, 40
  monkeypatch.setenv("TIED_LM_COMMIT", "reevaluated")
  train.train_and_evaluate(config, str(workdir), command="python -m tied_lm.main ...")
  launches = [json.loads(line) for line in (workdir / "launches.jsonl").read_text().splitlines()]
  assert [(launch["epochs_done"], launch["commit"] == "reevaluated") for launch in launches] == [
      (0, False), (1, True)]
  report = reproduce.run_report(workdir)
  assert report["commit"] == launches[0]["commit"]
  assert report["commands"] == launches


def test_a_run_still_training_gets_a_partial_report_that_never_replaces_a_finished_one(
    trained_run, tmp_path):
  root, results_dir = tmp_path / "runs", tmp_path / "results"
  for name in ("ptb_small_real_gamma6.5", "ptb_small_real"):
    shutil.copytree(trained_run[0], root / name)
    (root / name / "results.json").unlink()  # as if stopped after epoch 1 of 40
    config = json.loads((root / name / "config.json").read_text())
    (root / name / "config.json").write_text(json.dumps({**config, "num_epochs": 40}))
  results_dir.mkdir()
  finished = {**reproduce.run_report(trained_run[0]), "valid_perplexity": 123.0}
  (results_dir / "ptb_small_real.json").write_text(json.dumps(finished))

  reproduce.write_reports(root, results_dir)
  report = json.loads((results_dir / "ptb_small_real_gamma6.5.json").read_text())
  assert report["complete"] is False and report["num_epochs"] == 40
  assert report["test_perplexity"] is None
  # From the launch record, as the finished run counted them.
  assert report["num_params"] == trained_run[1]["num_params"] > 0
  assert report["valid_perplexity"] == pytest.approx(trained_run[1]["valid_perplexity"])
  assert report["epochs"] == report["best_epoch"] == 1
  launches = (root / "ptb_small_real_gamma6.5" / "launches.jsonl").read_text().splitlines()
  assert report["commands"] == [json.loads(line) for line in launches]
  assert report["versions"] == provenance.versions()
  # As the finished run names them: conftest's two host devices.
  assert report["hardware"]["devices"] == trained_run[1]["devices"] and len(
      trained_run[1]["devices"]) == 2
  sweep = (results_dir / "SWEEP.md").read_text()
  assert (f"| ptb_small_real_gamma6.5 | {report['valid_perplexity']:.2f} (1) | - | - "
          "| 1 of 40, partial |") in sweep
  assert json.loads((results_dir / "ptb_small_real.json").read_text()) == finished
  assert "| small | REAL | 86.3 / 82.7 | 123.0 / " in (results_dir / "TABLE.md").read_text()


def test_a_partial_report_takes_the_best_epoch_so_far_not_the_last(trained_run, tmp_path):
  workdir = tmp_path / "ptb_small_real"
  shutil.copytree(trained_run[0], workdir)
  (workdir / "results.json").unlink()
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  first = next(json.loads(line) for line in lines if json.loads(line)["kind"] == "epoch")
  second = {**first, "epoch": 2, "valid_perplexity": first["valid_perplexity"] + 5.0,
            "train_tokens_per_second": 123.0, "wall_seconds": first["wall_seconds"] + 60.0,
            "paused_seconds": 7.5}
  (workdir / "metrics.jsonl").write_text("\n".join([*lines, json.dumps(second)]) + "\n")
  report = reproduce.run_report(workdir)
  # The stops the wall time leaves out, summed over the epochs.
  assert report["paused_seconds"] == first["paused_seconds"] + 7.5
  assert [c["paused_seconds"] for c in report["curve"]] == [first["paused_seconds"], 7.5]
  assert (report["epochs"], report["best_epoch"]) == (2, 1)
  assert report["valid_perplexity"] == first["valid_perplexity"]
  assert (report["train_tokens_per_second"], report["wall_seconds"]) == (
      123.0, second["wall_seconds"])
  assert [c["valid_perplexity"] for c in report["curve"]] == [
      first["valid_perplexity"], second["valid_perplexity"]]
  # Records written before the stops were counted: unknown, not 0.
  del second["paused_seconds"]
  (workdir / "metrics.jsonl").write_text("\n".join([*lines, json.dumps(second)]) + "\n")
  assert reproduce.run_report(workdir)["paused_seconds"] is None


def test_a_restarted_run_keeps_the_lost_runs_longer_partial_report_until_it_catches_up(
    trained_run, tmp_path, capsys):
  root, results_dir = tmp_path / "runs", tmp_path / "results"
  shutil.copytree(trained_run[0], root / "ptb_small_real")
  (root / "ptb_small_real" / "results.json").unlink()  # one epoch of the restarted run
  results_dir.mkdir()
  output = results_dir / "ptb_small_real.json"
  partial = reproduce.run_report(root / "ptb_small_real")
  lost = {**partial, "epochs": 2, "best_epoch": 2, "valid_perplexity": 111.0}
  output.write_text(json.dumps(lost))

  reproduce.write_reports(root, results_dir)
  assert json.loads(output.read_text()) == lost
  assert f"kept {output}: 2 epochs, not replaced by {root / 'ptb_small_real'}'s 1" in (
      capsys.readouterr().out)
  output.write_text(json.dumps({**lost, "epochs": 1}))  # level: the run's own report wins
  reproduce.write_reports(root, results_dir)
  assert json.loads(output.read_text())["valid_perplexity"] == pytest.approx(
      partial["valid_perplexity"])


def test_a_misnamed_or_partly_copied_run_is_skipped_not_tabled(trained_run, tmp_path, capsys):
  # The tiny run is PTB, tied, augmented: a REAL run. Named as VD, its numbers were
  # tabled as VD's; copied without config.json, the report was a traceback.
  root, results_dir = tmp_path / "runs", tmp_path / "results"
  shutil.copytree(trained_run[0], root / "ptb_small_vd")
  shutil.copytree(trained_run[0], root / "wikitext2_small_real_seed1")
  (root / "ptb_small_al").mkdir(parents=True)
  shutil.copy(trained_run[0] / "metrics.jsonl", root / "ptb_small_al")
  results_dir.mkdir()
  renamed = {**reproduce.run_report(trained_run[0]), "dataset": "wikitext2"}
  (results_dir / "ptb_small_re.json").write_text(json.dumps(renamed))
  reproduce.write_reports(root, results_dir)
  assert capsys.readouterr().err.splitlines() == [
      f"skipped {root / 'ptb_small_al'}: not a complete tied_lm run (FileNotFoundError: "
      f"[Errno 2] No such file or directory: '{root / 'ptb_small_al' / 'config.json'}')",
      f"skipped {root / 'ptb_small_vd'}: ptb_small_vd holds a ptb real run, not the ptb vd its "
      "name says; rename it",
      f"skipped {root / 'wikitext2_small_real_seed1'}: wikitext2_small_real_seed1 holds a ptb "
      "real run, not the wikitext2 real its name says; rename it",
      f"skipped {results_dir / 'ptb_small_re.json'}: ptb_small_re holds a wikitext2 real run, "
      "not the ptb re its name says; rename it"]
  assert sorted(p.name for p in results_dir.glob("*.json")) == ["ptb_small_re.json"]
  table = (results_dir / "TABLE.md").read_text()
  assert "| small | VD | 92.6 / 87.3 | not run" in table
  assert "| small | RE | 89.9 / 85.1 | not run" in table


def test_a_rescore_scores_the_best_checkpoint_at_batch_one_once(trained_run, tmp_path, capfd):
  workdir = tmp_path / "run"
  shutil.copytree(trained_run[0], workdir)
  reproduce.rescore(workdir)
  assert capfd.readouterr().out.count("--eval_batch_size=1\n") == 2
  tokens = {"valid": 73_759, "test": 82_429}
  for split in ("valid", "test"):
    score = json.loads((workdir / f"eval_{split}_batch1.json").read_text())
    assert (score["split"], score["eval_batch_size"], score["tokens_scored"],
            score["checkpoint_step"]) == (split, 1, tokens[split], 40)
    # Batch 1 conditions each row's first tokens on the text before: close to batch 10.
    batch10 = trained_run[1][f"{split}_perplexity"]
    assert score["perplexity"] != batch10
    assert score["perplexity"] == pytest.approx(batch10, rel=0.01)
    assert reproduce.current_batch1(workdir, split) == score
  report = reproduce.run_report(workdir)
  assert report["test_perplexity_batch1"] == json.loads(
      (workdir / "eval_test_batch1.json").read_text())["perplexity"]
  reproduce.rescore(workdir)  # current: nothing to run
  assert "rescore" not in capfd.readouterr().out


def test_a_failed_rescore_is_one_line(tmp_path, capfd):
  (tmp_path / "run").mkdir()
  with pytest.raises(UserError, match=r"rescoring .*run on valid failed \(exit 2\); its output"):
    reproduce.rescore(tmp_path / "run")
  assert "is not a tied_lm run (no config.json)" in capfd.readouterr().err


def test_a_signal_to_the_harness_is_its_exit_status_after_the_reports(tmp_path):
  # A scheduler that preempts the harness must see 143, as from tied_lm.main, not 2.
  root, results_dir = tmp_path / "runs", tmp_path / "results"
  harness = subprocess.Popen(
      [sys.executable, "-m", "experiments.reproduce", f"--root={root}",
       f"--results_dir={results_dir}", "--sizes=small", "--variants=vd",
       *(f"--set={s}" for s in TINY)],
      cwd=provenance.REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  assert harness.stdout.readline().startswith("start ptb_small_vd")
  harness.send_signal(signal.SIGTERM)
  _, stderr = harness.communicate(timeout=300)
  assert harness.returncode == 128 + signal.SIGTERM
  assert stderr.strip().splitlines()[-1] == (
      "stopped by SIGTERM: 1 run(s) resume from their checkpoints when this command runs again")
  assert (results_dir / "TABLE.md").is_file()  # the reports were still written
