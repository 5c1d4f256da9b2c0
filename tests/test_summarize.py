"""The run table: its numbers, the paper's names, plots and one-line errors."""

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from configs import default, paper
from tied_lm import summarize, train
from tied_lm.errors import UserError


@pytest.mark.parametrize("size", list(paper.SIZES))
@pytest.mark.parametrize("variant", list(paper.VARIANTS))
def test_describe_names_every_paper_config(size, variant):
  config = paper.get_config("ptb", f"{size},{variant}")
  assert summarize.describe(config.to_dict()) == (size, variant)


@pytest.mark.parametrize("variant, flipped", [("re", "re+bias"), ("real", "real+bias"),
                                              ("vd", "vd-bias"), ("al", "al-bias")])
def test_describe_names_the_output_bias_when_it_differs_from_the_paper(variant, flipped):
  config = paper.get_config("ptb", f"small,{variant}")
  config.model.output_bias = not config.model.output_bias
  assert summarize.describe(config.to_dict()) == ("small", flipped)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
  runs = []
  for name, augmented in (("tiny_re", False), ("tiny_real", True)):
    config = default.get_config()
    config.num_epochs, config.max_steps_per_epoch = 2, 15
    config.loss.augmented = augmented
    workdir = tmp_path_factory.mktemp("runs") / name
    runs.append((workdir, train.train_and_evaluate(config, str(workdir))))
  return runs


@pytest.fixture
def summarize_cli(run_module):
  return lambda *args: run_module("tied_lm.summarize", *map(str, args), timeout=120)


def test_summarize_prints_the_runs_numbers_and_plots_them(two_runs, tmp_path, summarize_cli):
  plot = tmp_path / "curves.png"
  result = summarize_cli(*(w for w, _ in two_runs), f"--plot={plot}")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0].startswith("| run | dataset | size | variant | epochs | best valid ppl")
  for (workdir, results), line in zip(two_runs, lines[2:4], strict=True):
    cells = [c.strip() for c in line.strip("|").split("|")]
    variant = "real" if workdir.name == "tiny_real" else "re"
    assert cells[:5] == [workdir.name, "ptb", "64 units", variant, "2"]
    assert cells[5] == f"{results['valid_perplexity']:.2f} ({results['best_epoch']})"
    assert cells[6] == f"{results['test_perplexity']:.2f}"
    assert cells[7] == "82,429"
    assert cells[8] == f"{results['num_params'] / 1e6:.2f}M"
  assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"


def test_a_run_in_progress_has_no_test_perplexity(two_runs, tmp_path):
  workdir, _ = two_runs[0]
  partial = tmp_path / "partial"
  partial.mkdir()
  (partial / "config.json").write_text((workdir / "config.json").read_text())
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  kinds = [json.loads(line)["kind"] for line in lines]
  first_epoch = lines[: kinds.index("epoch") + 1]  # as if stopped during epoch 2
  (partial / "metrics.jsonl").write_text("\n".join(first_epoch) + "\n")
  run = summarize.load_run(partial)
  assert run["epochs"] == 1 and run["test_perplexity"] is None
  assert "| - | - | - |" in summarize.table([run])


def test_a_run_in_its_first_epoch_is_a_row_of_dashes_beside_the_others(
    two_runs, tmp_path, summarize_cli):
  # It was refused, and the whole table with it.
  workdir, _ = two_runs[0]
  starting = tmp_path / "starting"
  starting.mkdir()
  (starting / "config.json").write_text((workdir / "config.json").read_text())
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  steps = [line for line in lines if json.loads(line)["kind"] != "epoch"][:1]
  (starting / "metrics.jsonl").write_text("\n".join(steps) + "\n")
  plot = tmp_path / "curves.png"
  result = summarize_cli(workdir, starting, f"--plot={plot}")
  assert result.returncode == 0, result.stderr
  rows = result.stdout.splitlines()[2:4]
  assert rows[0].startswith(f"| {workdir.name} | ptb | 64 units | re | 2 | ")
  assert rows[1] == "| starting | ptb | 64 units | re | 0 | - | - | - | - | - | - |"
  assert plot.read_bytes()[:4] == b"\x89PNG"  # the finished run's curve
  result = summarize_cli(starting, f"--plot={plot}")
  assert result.returncode == 0 and result.stderr.strip().splitlines()[-1] == (
      f"no epoch has finished yet: {plot} not drawn")


@pytest.mark.parametrize("line, kind", [("[1, 2]", "list"), ('"epoch"', "str")])
def test_a_metrics_line_that_is_not_an_object_is_one_line(two_runs, tmp_path, line, kind):
  workdir, _ = two_runs[0]
  damaged = tmp_path / "damaged"
  damaged.mkdir()
  (damaged / "config.json").write_text((workdir / "config.json").read_text())
  (damaged / "metrics.jsonl").write_text(
      (workdir / "metrics.jsonl").read_text().splitlines()[0] + f"\n{line}\n")
  with pytest.raises(UserError, match=(
      rf"^{damaged / 'metrics.jsonl'} is damaged: line 2 is a JSON {kind}, not an object")):
    summarize.load_run(damaged)


@pytest.mark.parametrize("make,message", [
    (lambda d: None, "does not exist"),
    (lambda d: d.write_text(""), "is not a directory"),
    (lambda d: d.mkdir(), "is not a tied_lm run (no config.json or results.json)"),
    # It said "has no finished epoch yet".
    (lambda d: [d.mkdir(), (d / "config.json").write_text("{}"), (d / "metrics.jsonl").mkdir()],
     "/metrics.jsonl is a folder, where a run keeps its file metrics.jsonl: move it away or "
     "use another --workdir"),
    # A folder named results.json showed the run as unfinished; one named config.json was
    # passed over for results.json's config.
    (lambda d: [d.mkdir(), (d / "config.json").write_text("{}"), (d / "results.json").mkdir()],
     "/results.json is a folder, where a run keeps its file results.json: move it away or "
     "use another --workdir"),
    (lambda d: [d.mkdir(), (d / "config.json").mkdir(), (d / "results.json").write_text("{}")],
     "/config.json is a folder, where a run keeps its file config.json: move it away or "
     "use another --workdir"),
])
def test_a_folder_that_is_not_a_run_is_one_line(tmp_path, make, message, summarize_cli):
  folder = tmp_path / "folder"
  make(folder)
  result = summarize_cli(folder)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      f"error: {folder}{'' if message.startswith('/') else ' '}{message}"]


def test_a_finished_run_with_an_empty_metrics_file_says_so(two_runs, tmp_path):
  workdir, _ = two_runs[0]
  emptied = tmp_path / "emptied"
  emptied.mkdir()
  for name in ("config.json", "results.json"):
    (emptied / name).write_text((workdir / name).read_text())
  (emptied / "metrics.jsonl").write_text("")
  with pytest.raises(UserError, match=(
      "metrics.jsonl holds no epoch record, though results.json says the run finished")):
    summarize.load_run(emptied)


def test_a_damaged_metrics_file_is_one_line_naming_it(two_runs, tmp_path, summarize_cli):
  workdir, _ = two_runs[0]
  damaged = tmp_path / "damaged"
  damaged.mkdir()
  (damaged / "config.json").write_text((workdir / "config.json").read_text())
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  (damaged / "metrics.jsonl").write_text("\n".join([*lines[:2], lines[2][:20]]) + "\n")
  result = summarize_cli(damaged)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      f"error: {damaged / 'metrics.jsonl'} is damaged: line 3 is not JSON (Unterminated string "
      "starting at); restore or remove it"]


def test_tokens_per_second_is_the_median_that_results_json_reports(two_runs):
  for workdir, results in two_runs:  # two epochs: the median is their mean
    assert summarize.load_run(workdir)["tokens_per_second"] == pytest.approx(
        results["train_tokens_per_second"], rel=1e-12)


def test_the_best_epoch_is_the_lowest_validation_and_the_speed_the_median(two_runs, tmp_path):
  # Three epochs whose validation rises after the second, at three speeds: the median is
  # not the mean, nor the best epoch the last.
  run = tmp_path / "three_epochs"
  run.mkdir()
  (run / "config.json").write_text((two_runs[0][0] / "config.json").read_text())
  epochs = [{"kind": "epoch", "epoch": epoch, "valid_perplexity": valid,
             "train_tokens_per_second": speed, "wall_seconds": 10.0 * epoch}
            for epoch, valid, speed in ((1, 30.0, 100.0), (2, 20.0, 200.0), (3, 25.0, 600.0))]
  (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in epochs))
  summary = summarize.load_run(run)
  assert (summary["best_valid_perplexity"], summary["best_epoch"]) == (20.0, 2)
  assert summary["tokens_per_second"] == 200.0 and summary["wall_seconds"] == 30.0
  assert summary["curve"] == [(1, 30.0), (2, 20.0), (3, 25.0)]


def test_a_plot_path_of_a_suffix_alone_asks_for_a_name(tmp_path):
  # It said "must end in .png, .pdf or .svg" of ".png".
  for name, suffix in ((".png", "png"), ("..png", "png"), ("...svg", "svg")):
    with pytest.raises(UserError, match=(  # savefig wrote "..png.png", "...svg.png"
        rf"^--plot=.*/{re.escape(name)}: the image needs a name before \.{suffix}, "
        rf"e\.g\. curves\.{suffix}$")):
      summarize.check_plot_path(tmp_path / name)


def test_a_plot_path_that_is_a_folder_is_refused_before_the_table(tmp_path):
  (tmp_path / "curves.png").mkdir()  # savefig failed on it after the table was printed
  with pytest.raises(UserError, match=r"--plot=.*curves.png is a folder; name an image file"):
    summarize.check_plot_path(tmp_path / "curves.png")
  with pytest.raises(UserError, match=(  # the same, where root passed an access test
      r"^cannot write the folder of --plot /proc \(no file can be made in it\)$")):
    summarize.check_plot_path(Path("/proc/curves.png"))


def test_plotting_without_matplotlib_is_refused_before_the_table(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
  with pytest.raises(UserError, match=r'^plotting needs matplotlib: pip install -e "\.\[plot\]"'):
    summarize.check_plot_path(tmp_path / "curves.png")


def test_a_blank_plot_path_is_refused_not_ignored(two_runs, summarize_cli):
  result = summarize_cli(two_runs[0][0], "--plot=")
  assert result.returncode == 2 and result.stdout == ""
  assert result.stderr.strip().splitlines() == ["error: flag --plot=: is empty: name an image file"]


@pytest.mark.parametrize("damage,field", [
    # An empty results.json showed the run as unfinished; a field removed was a KeyError.
    (lambda config, results: ({**config}, {}), "'test_perplexity'"),
    (lambda config, results: ({**config, "model": {"embed_dim": 64}}, results), "'hidden_size'"),
    (lambda config, results: ({**config, "loss": None}, results), "'NoneType' object"),
    # Fields of the wrong type were a traceback from the table's number formats.
    (lambda config, results: (config, {**results, "num_params": "706048"}),
     "'706048' is not a number"),
    (lambda config, results: (config, {**results, "test_perplexity": True}), "True is not a"),
])
def test_a_run_file_without_its_fields_is_one_line(two_runs, tmp_path, damage, field):
  workdir, _ = two_runs[0]
  edited = tmp_path / "edited"
  edited.mkdir()
  (edited / "metrics.jsonl").write_text((workdir / "metrics.jsonl").read_text())
  config, results = damage(json.loads((workdir / "config.json").read_text()),
                           json.loads((workdir / "results.json").read_text()))
  (edited / "config.json").write_text(json.dumps(config))
  (edited / "results.json").write_text(json.dumps(results))
  with pytest.raises(UserError, match=(
      rf"^{edited} holds a config.json, results.json or metrics.jsonl that is not a tied_lm "
      rf"run's \(missing or wrong field: {field}")):
    summarize.load_run(edited)


@pytest.mark.parametrize("field", ["wall_seconds", "valid_perplexity", None])
def test_a_null_in_an_epoch_record_or_no_config_anywhere_is_one_line(two_runs, tmp_path, field):
  # A null wall time was a TypeError from the table; a null perplexity showed the finished
  # run as "-"; no config.json and none in results.json was a KeyError.
  workdir, _ = two_runs[0]
  edited = tmp_path / "edited"
  shutil.copytree(workdir, edited)
  if field is None:
    (edited / "config.json").unlink()
    results = json.loads((edited / "results.json").read_text())
    del results["config"]
    (edited / "results.json").write_text(json.dumps(results))
  else:
    records = [json.loads(line) for line in (edited / "metrics.jsonl").read_text().splitlines()]
    [r for r in records if r["kind"] == "epoch"][-1][field] = None
    (edited / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  with pytest.raises(UserError, match=(
      rf"^{edited} holds a config.json, results.json or metrics.jsonl that is not a tied_lm "
      rf"run's \(missing or wrong field: {'None is not a number' if field else repr('config')}")):
    summarize.load_run(edited)


def test_run_labels_tell_runs_apart(tmp_path, monkeypatch):
  # "." gave a blank run cell; a/run and b/run gave two rows named "run".
  (tmp_path / "ptb_small_vd").mkdir()
  monkeypatch.chdir(tmp_path / "ptb_small_vd")
  assert summarize.run_labels([".", "../other"]) == ["ptb_small_vd", "other"]
  assert summarize.run_labels(["a/run", "b/run"]) == ["a/run", "b/run"]
