"""Research tools: the compare experiment end to end, the evaluate CLI
against the trainer's own records, and plot_runs."""

import json
import math
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from nitp_jax import checkpoint as ckpt_lib
from nitp_jax import config as config_lib
from nitp_jax import evaluate
from nitp_jax import plot
from nitp_jax.experiments import compare
from tests.conftest import train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
RUNS = ("ntp", "nitp", "k0")
# Compile time dominates these tiny runs; XLA's backend optimisation buys
# nothing at this size (all processes of a test use the same flags).
ENV = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="--xla_backend_optimization_level=0")


def cli(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=ENV,
                        capture_output=True, text=True, timeout=timeout)


def records(workdir: str, kind: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["kind"] == kind]


def png_size(path: str) -> tuple[int, int]:
  with open(path, "rb") as f:
    head = f.read(24)
  assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", head
  return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def comparison(prepared_dir, tmp_path_factory) -> tuple[str, str]:
  """(report folder, stdout) of one compare run: ntp, nitp and ablation k0."""
  root = tmp_path_factory.mktemp("compare")
  config_file = root / "tiny_test.py"
  config_file.write_text(textwrap.dedent(f"""
      from tests.conftest import train_config
      def get_config():
        return train_config({prepared_dir!r}, steps=100, eval_every=3, checkpoint_every=100,
                            log_every=1, geometry_every=2, peak_flops_per_device=1e12)
  """))
  out = str(root / "report")
  proc = cli("nitp_jax.experiments.compare", f"--config={config_file}", f"--out={out}",
             f"--config.train.steps={STEPS}", "--ablation=k0:nitp.target_layer=0")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out, proc.stdout


def test_compare_writes_figure_and_report(comparison):
  out, stdout = comparison
  width, height = png_size(os.path.join(out, "compare.png"))
  assert width >= 800 and height >= 600
  assert os.path.getsize(os.path.join(out, "compare.png")) > 30_000
  with open(os.path.join(out, "report.md")) as f:
    md = f.read()
  rows = [l for l in md.splitlines() if l.startswith("| ") and not l.startswith("| run ")]
  assert [r.split("|")[1].strip() for r in rows] == list(RUNS), md
  assert "NITP vs NTP after 6 steps" in md and "![curves](compare.png)" in md
  with open(os.path.join(out, "report.json")) as f:
    report = json.load(f)
  assert [r["run"] for r in report["runs"]] == list(RUNS)
  assert report["summary"] in md and report["summary"] in stdout
  for row, line in zip(report["runs"], rows):
    run = row["workdir"]
    assert row["step"] == STEPS and os.path.isdir(os.path.join(run, "checkpoints", str(STEPS)))
    last_eval, last_probe = records(run, "eval")[-1], records(run, "probe")[-1]
    assert row["heldout_loss"] == last_eval["ntp"] and row["heldout_ppl"] == last_eval["ppl"]
    assert row["erank_last"] == last_probe["erank_last"]
    assert row["train_ntp"] == records(run, "train")[-1]["ntp"]  # last 10% of 6 steps = 1
    assert f"{row['heldout_loss']:.4f}" in line and f"{row['erank_last']:.1f}" in line
  ntp, nitp, k0 = report["runs"]
  assert ntp["train_nitp"] is None and "| – |" in rows[0]
  assert 0 < nitp["train_nitp"] < 1 and 0 < k0["train_nitp"] < 1


def test_compare_runs_share_data_seeds_and_init(comparison):
  out, _ = comparison
  saved = {}
  for name in RUNS:
    ckpt = ckpt_lib.Checkpointer(os.path.join(out, name), keep=10, async_save=False)
    saved[name] = ckpt.saved_config(STEPS).to_dict()
    ckpt.close()
  for key in ("data", "train"):
    assert saved["ntp"][key] == saved["nitp"][key] == saved["k0"][key], key
  assert saved["ntp"]["nitp"]["weight"] == 0.0 and saved["nitp"]["nitp"]["weight"] == 1.0
  assert saved["k0"]["nitp"]["target_layer"] == 0 and saved["nitp"]["nitp"]["target_layer"] == 1
  # Same first batch and the same backbone init (the projector has its own rng).
  first = {name: records(os.path.join(out, name), "train")[0] for name in ("ntp", "nitp")}
  assert first["ntp"]["step"] == first["nitp"]["step"] == 1
  assert first["ntp"]["ntp"] == first["nitp"]["ntp"]


def test_evaluate_cli_matches_the_trainers_last_eval(comparison):
  out, _ = comparison
  run = os.path.join(out, "nitp")
  proc = cli("nitp_jax.evaluate", f"--workdir={run}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert set(result) >= {"step", "loss", "ppl", "nitp", "nitp_cos", "erank_last", "cos_last",
                         "erank_target", "cos_target", "tokens", "batches"}
  last = records(run, "eval")[-1]
  assert result["step"] == STEPS == last["step"] and result["tokens"] == last["tokens"]
  for ours, theirs in (("loss", "ntp"), ("nitp", "nitp"), ("nitp_cos", "nitp_cos")):
    assert result[ours] == pytest.approx(last[theirs], rel=1e-5, abs=1e-6), ours
  assert result["ppl"] == pytest.approx(math.exp(result["loss"]))
  assert result["erank_last"] >= 1 and -1 <= result["cos_last"] <= 1


def test_evaluate_geometry_on_the_probe_batch_matches_the_probe_record(comparison):
  out, _ = comparison
  run = os.path.join(out, "ntp")
  result = evaluate.evaluate_run(run, step=STEPS, batches=1)
  assert "nitp" not in result and result["batches"] == 1
  probe = records(run, "probe")[-1]
  assert probe["step"] == STEPS
  for key in evaluate.GEOMETRY_KEYS:
    assert result[key] == pytest.approx(probe[key], rel=1e-4, abs=1e-5), key


def test_evaluate_moe_uses_the_trained_dispatch_unless_told(trained_moe_run):
  """Default: the dispatch the run trained with (dropless), reproducing the
  trainer's eval record; --dispatch=dense computes the same model."""
  result = evaluate.evaluate_run(trained_moe_run)
  last = records(trained_moe_run, "eval")[-1]
  assert result["dispatch"] == "dropless" and result["step"] == last["step"]
  assert result["loss"] == pytest.approx(last["ntp"], rel=1e-5, abs=1e-6)
  dense = evaluate.evaluate_run(trained_moe_run, dispatch="dense")
  assert dense["dispatch"] == "dense"
  assert dense["loss"] == pytest.approx(result["loss"], rel=1e-5, abs=1e-6)
  with pytest.raises(config_lib.ConfigError, match="model.moe.dispatch='sparse' is invalid"):
    evaluate.evaluate_run(trained_moe_run, dispatch="sparse")


def test_evaluate_cli_errors_in_one_line(tmp_path):
  missing = str(tmp_path / "no_run")
  proc = cli("nitp_jax.evaluate", f"--workdir={missing}")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      f"error: no checkpoint under {missing}/checkpoints: train first, or pass the --workdir "
      "of a training run"]
  assert not os.path.exists(missing)


def _write_metrics(run_dir, nitp: bool, cut_last_line: bool = False, seed: int = 0) -> None:
  os.makedirs(run_dir)
  rng = np.random.default_rng(seed)
  lines = []
  for step in range(1, 101):
    rec = {"step": step, "kind": "train", "ntp": 8 * math.exp(-step / 40) + rng.normal(0, .1)}
    if nitp:
      rec["nitp"] = 0.1 + 0.9 * math.exp(-step / 10)
    lines.append(json.dumps(rec))
    if step % 25 == 0:
      lines.append(json.dumps({"step": step, "kind": "eval", "ntp": 9 * math.exp(-step / 50)
                               + seed / 10, "next_line/acc": 0.25 + seed / 100}))
    if step % 20 == 0:
      lines.append(json.dumps({"step": step, "kind": "probe", "erank_last": 50 - step / 4,
                               "cos_last": step / 200, "erank_target": 60.0,
                               "cos_target": 0.1}))
  if cut_last_line:
    lines.append('{"step": 101, "kind": "tr')
  (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_plot_runs_writes_a_png(tmp_path):
  a, b = tmp_path / "ntp", tmp_path / "nitp"
  _write_metrics(a, nitp=False)
  _write_metrics(b, nitp=True, cut_last_line=True)
  out = plot.plot_runs([str(a), str(b)], str(tmp_path / "fig" / "runs.png"))
  width, height = png_size(out)
  assert width >= 800 and height >= 600 and os.path.getsize(out) > 30_000
  pixels = plot.plt.imread(out)
  assert pixels.std() > 0.05  # not a blank canvas
  assert plot.run_labels(["x/run", "y/run", "z"]) == ["x/run", "y/run", "z"]
  with pytest.raises(plot.PlotError, match="no metrics.jsonl.*nitp_jax.train's --workdir"):
    plot.plot_runs([str(tmp_path / "missing")], str(tmp_path / "x.png"))


def test_plot_out_path_is_the_file_written(tmp_path):
  # matplotlib adds ".png" to a path without an extension, and an extension
  # it cannot write was a ValueError traceback.
  assert plot.figure_path(str(tmp_path / "fig")) == str(tmp_path / "fig.png")
  assert plot.figure_path("a/b.PDF") == "a/b.PDF"
  with pytest.raises(plot.PlotError, match=r"cannot write a figure to 'x.txt'.*\.png"):
    plot.figure_path("x.txt")


def test_seed_groups_are_drawn_as_mean_and_band(tmp_path):
  groups = {}
  for arm in ("ntp", "nitp"):
    groups[arm] = []
    for seed in range(3):
      run = tmp_path / arm / f"seed_{seed}"
      _write_metrics(run, nitp=arm == "nitp", seed=seed)
      groups[arm].append(str(run))
  steps, mean, std = plot.seed_series([plot.read_records(d) for d in groups["ntp"]], "eval",
                                      "ntp", smoothed=False)
  assert list(steps) == [25, 50, 75, 100]
  np.testing.assert_allclose(mean, 9 * np.exp(-steps / 50) + 0.1)
  np.testing.assert_allclose(std, np.std([0, 0.1, 0.2]), rtol=1e-6)
  out = plot.plot_groups(groups, str(tmp_path / "bands.png"))
  assert png_size(out)[0] >= 800 and plot.plt.imread(out).std() > 0.05


def test_seeded_runs_and_their_summary(prepared_dir, tmp_path):
  cfg = train_config(prepared_dir, steps=3)
  runs = compare.plan_runs(cfg, str(tmp_path), [], seeds=3)
  assert [r.name for r in runs] == [f"{a}/seed_{i}" for a in ("ntp", "nitp") for i in range(3)]
  assert [r.cfg.data.shuffle_seed for r in runs] == [0, 1, 2] * 2
  assert [r.cfg.train.seed for r in runs] == [0, 1, 2] * 2
  assert {r.cfg.data.seed for r in runs} == {0}  # same split and tokenizer for every seed
  rows = [{"run": r.name, "changes": r.changes, "step": 3,
           "heldout_loss": 5.0 + 0.1 * r.seed - (0.01 if r.arm == "nitp" else 0.0),
           "erank_last": 10.0, "cos_last": 0.5, "next_line/acc": 0.25} for r in runs]
  table = compare.aggregate(rows, runs)
  assert [a["run"] for a in table] == ["ntp", "nitp"] and table[0]["seeds"] == 3
  assert table[0]["heldout_loss"] == pytest.approx(5.1)
  assert table[0]["heldout_loss_std"] == pytest.approx(np.std([5.0, 5.1, 5.2]))
  md = compare.markdown_table(table)
  assert "5.1000 ± 0.0816" in md and "next_line/acc" in md
  summary = compare.seed_summary(rows, runs)
  assert "-0.0100 ± 0.0000" in summary and "larger than its spread" in summary
  with pytest.raises(config_lib.ConfigError, match="--seeds=0"):
    compare.plan_runs(cfg, str(tmp_path), [], seeds=0)


def test_report_shows_each_sources_held_out_loss(tmp_path):
  """A mixture's eval records carry ntp_s<i> (heldout_sets.combine): the
  report gives each as a column and in report.json; one source, none."""
  cfg = config_lib.base_config()
  cfg.data.input = "web/,code/"
  runs = []
  for arm in ("ntp", "nitp"):
    _write_metrics(tmp_path / arm, nitp=arm == "nitp")
    with open(tmp_path / arm / "metrics.jsonl", "a") as f:
      f.write(json.dumps({"step": 100, "kind": "eval", "ntp": 2.5, "ppl": math.exp(2.5),
                          "ntp_s0": 2.0, "ntp_s1": 3.75 if arm == "nitp" else 3.5,
                          "tokens_s0": 10.0, "nitp_s1": 0.5}) + "\n")
    runs.append(compare.RunSpec(arm, cfg, arm, workdir=str(tmp_path / arm), arm=arm))
  report = compare.write_report(str(tmp_path), runs, str(tmp_path / "compare.png"))
  assert [(r["heldout_loss_s0"], r["heldout_loss_s1"]) for r in report["runs"]] == [
      (2.0, 3.5), (2.0, 3.75)]
  assert not any("tokens_s0" in r or "heldout_loss_s2" in r for r in report["runs"])
  md = (tmp_path / "report.md").read_text()
  assert "| held-out loss | held-out ppl | held-out s0 | held-out s1 | NITP loss |" in md
  assert "| 2.5000 | 12.18 | 2.0000 | 3.7500 |" in md
  assert "(s0 = web/, s1 = code/)" in md
  assert json.loads((tmp_path / "report.json").read_text()) == report
  single = [compare.RunSpec(r.arm, train_config("", steps=3), r.arm, arm=r.arm,
                            workdir=str(tmp_path / f"one_{r.arm}")) for r in runs]
  for r in single:
    _write_metrics(tmp_path / f"one_{r.arm}", nitp=r.arm == "nitp")
  one = compare.write_report(str(tmp_path), single, str(tmp_path / "compare.png"))
  assert not any(k.startswith("heldout_loss_s") for r in one["runs"] for k in r)
  assert "held-out s" not in (tmp_path / "report.md").read_text()


def test_ablation_values_take_the_fields_type():
  cfg = config_lib.base_config()
  name, overrides = compare.parse_ablation(
      "mix:nitp.target_layer=0,nitp.stop_gradient=false,nitp.weight=1,nitp.loss=mse", cfg)
  assert name == "mix"
  assert overrides == {"nitp.target_layer": 0, "nitp.stop_gradient": False,
                       "nitp.weight": 1.0, "nitp.loss": "mse"}
  assert isinstance(overrides["nitp.weight"], float)
  for spec, message in (("k0", "use NAME:field=value"),
                        ("x:nitp.nope=1", "no field 'nitp.nope'"),
                        ("x:nitp=1", "is a group of fields"),
                        ("x:nitp.target_layer=0.5", "must be of type int"),
                        ("x:nitp.stop_gradient=maybe", "must be true or false"),
                        ("x:data.seed=1", "keeps the data and seeds")):
    with pytest.raises(config_lib.ConfigError, match=message):
      compare.parse_ablation(spec, cfg)
  with pytest.raises(config_lib.ConfigError, match="name 'nitp' is taken"):
    compare.plan_runs(cfg, "/tmp/unused", ["nitp:nitp.shift=0"])
  cfg.nitp.weight = 0.0
  with pytest.raises(config_lib.ConfigError, match="needs the NITP config"):
    compare.plan_runs(cfg, "/tmp/unused", [])


def test_train_config_is_unchanged_by_planning(prepared_dir, tmp_path):
  cfg = train_config(prepared_dir, steps=3)
  before = cfg.to_json()
  runs = compare.plan_runs(cfg, str(tmp_path), ["k0:nitp.target_layer=0"])
  assert cfg.to_json() == before
  assert [r.name for r in runs] == list(RUNS)
  assert [r.cfg.nitp.weight for r in runs] == [0.0, 1.0, 1.0]
  assert {r.cfg.data.prepared_dir for r in runs} == {prepared_dir}


def test_compare_with_seeds_end_to_end(prepared_dir, tmp_path):
  cfg = train_config(prepared_dir, steps=2, eval_every=2, checkpoint_every=2, geometry_every=2)
  report = compare.compare(cfg, str(tmp_path), seeds=2, log=lambda _: None)
  assert [a["run"] for a in report["arms"]] == ["ntp", "nitp"]
  assert all(a["seeds"] == 2 and a["heldout_loss_std"] > 0 for a in report["arms"])
  first = {r["run"]: records(r["workdir"], "train")[0]["ntp"] for r in report["runs"]}
  assert first["ntp/seed_0"] == first["nitp/seed_0"] != first["ntp/seed_1"]
  evals = {r["run"]: records(r["workdir"], "eval")[-1]["tokens"] for r in report["runs"]}
  assert len(set(evals.values())) == 1  # one held-out split for every seed
  md = open(os.path.join(tmp_path, "report.md")).read()
  assert "over 2 seeds" in md and " ± " in md and png_size(report["figure"])[0] >= 800
