"""NTP vs NITP (and ablations) with identical data order and seeds.

  python -m nitp_jax.experiments.compare --config=configs/tiny.py --out=DIR \
      [--seeds=3] [--ablation=k0:nitp.target_layer=0] \
      [--ablation=nosg:nitp.stop_gradient=false] [--config.train.steps=N ...]

Trains, one after the other, in DIR/<name>/:
  ntp    the config with nitp.weight = 0 (plain next-token prediction)
  nitp   the config as given
  NAME   one per --ablation=NAME:field=value[,field=value...]: the overrides
         applied on top of the NITP config, each value parsed with the
         field's type (bool: true/false)
All runs share one prepared data directory (config.data.prepared_dir, or
DIR/data) and the config's data.seed and train.seed, so they see the same
batches in the same order. Rerunning the command resumes unfinished runs.
Then writes DIR/compare.png (nitp_jax.plot), DIR/report.md (a table of final
metrics and one line on what it shows) and DIR/report.json (the same numbers).

--seeds=N trains every arm N times, in DIR/<arm>/seed_<i>: seed i shifts the
data order (data.shuffle_seed) and the initialisation (train.seed) by i, the
same for every arm, over the same prepared data and held-out split. The
table shows mean ± standard deviation over the seeds, the summary the
NITP − NTP held-out difference per seed (mean ± std), and the figure the
seed mean with a ±1 std band.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Callable, Sequence

import ml_collections
import numpy as np
from absl import flags

from nitp_jax import cli
from nitp_jax import config as config_lib
from nitp_jax import layout
from nitp_jax import plot
from nitp_jax import train

RESERVED_NAMES = ("ntp", "nitp", "data")
FIXED_PREFIXES = ("data.", "train.seed")  # equal across runs by design
LAST_FRACTION = 0.1   # "final" training losses: mean over the last 10% of logged steps
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


@dataclasses.dataclass
class RunSpec:
  name: str               # the arm, or arm/seed_<i> with several seeds
  cfg: ml_collections.ConfigDict
  changes: str            # what differs from the NITP config, in words
  workdir: str = ""
  arm: str = ""
  seed: int = 0


# ------------------------------------------------------------------ ablations

def _field(cfg: ml_collections.ConfigDict, dotted: str) -> Any:
  try:
    node = cfg[dotted]
  except (KeyError, TypeError):
    raise config_lib.ConfigError(f"config has no field {dotted!r}: see nitp_jax/config.py "
                                 "for the fields") from None
  if isinstance(node, ml_collections.ConfigDict):
    raise config_lib.ConfigError(f"config.{dotted} is a group of fields: name one of "
                                 f"{', '.join(f'{dotted}.{k}' for k in node.keys())}")
  return node


def parse_value(cfg: ml_collections.ConfigDict, dotted: str, text: str) -> Any:
  """`text` as a value of config field `dotted`, with the field's type."""
  current = _field(cfg, dotted)
  text = text.strip()
  try:
    if isinstance(current, bool):
      if text.lower() not in TRUE + FALSE:
        raise ValueError
      return text.lower() in TRUE
    if isinstance(current, int):
      return int(text)
    if isinstance(current, float):
      return float(text)
  except ValueError:
    kind = "true or false" if isinstance(current, bool) else f"of type {type(current).__name__}"
    raise config_lib.ConfigError(f"config.{dotted}={text!r} is invalid: must be {kind} "
                                 f"(default {current!r})") from None
  return text.strip("'\"")


def parse_ablation(spec: str, cfg: ml_collections.ConfigDict) -> tuple[str, dict[str, Any]]:
  """'NAME:field=value,field=value' -> (NAME, {field: typed value})."""
  usage = f"--ablation={spec!r} is invalid: use NAME:field=value[,field=value...]"
  name, sep, body = spec.partition(":")
  if not sep or not body.strip():
    raise config_lib.ConfigError(usage)
  if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
    raise config_lib.ConfigError(f"{usage} (NAME: letters, digits, '_', '-', '.')")
  overrides = {}
  for item in body.split(","):
    field, eq, value = item.partition("=")
    field = field.strip().removeprefix("config.")
    if not eq or not field:
      raise config_lib.ConfigError(usage)
    if field.startswith(FIXED_PREFIXES):
      raise config_lib.ConfigError(
          f"--ablation={spec!r} changes {field}: compare keeps the data and seeds of all "
          "runs identical; set it for every run with --config." + field)
    overrides[field] = parse_value(cfg, field, value)
  return name, overrides


def _with(cfg: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  out = ml_collections.ConfigDict(cfg.to_dict())
  out.update_from_flattened_dict(overrides)
  return out


def plan_runs(cfg: ml_collections.ConfigDict, out_dir: str, ablations: Sequence[str],
              seeds: int = 1) -> list[RunSpec]:
  """The runs (ntp, nitp, ablations; each `seeds` times), each config
  validated, sharing data."""
  if seeds < 1:
    raise config_lib.ConfigError(f"--seeds={seeds} is invalid: must be >= 1")
  if cfg.nitp.weight <= 0:
    raise config_lib.ConfigError(
        f"config.nitp.weight={cfg.nitp.weight}: compare needs the NITP config (λ > 0); the "
        "NTP baseline (λ = 0) is derived from it")
  out_dir = os.path.abspath(out_dir)
  base = _with(cfg, {"data.prepared_dir": os.path.abspath(layout.data_dir(cfg, out_dir))})
  n = cfg.nitp
  runs = [RunSpec("ntp", _with(base, {"nitp.weight": 0.0}), "λ = 0"),
          RunSpec("nitp", base, f"config as given (λ = {n.weight:g}, k = {n.target_layer})")]
  for spec in ablations:
    name, overrides = parse_ablation(spec, base)
    if name in RESERVED_NAMES or name in [r.name for r in runs]:
      raise config_lib.ConfigError(
          f"--ablation={spec!r}: the name {name!r} is taken (reserved: "
          f"{', '.join(RESERVED_NAMES)}; names must be unique)")
    runs.append(RunSpec(name, _with(base, overrides),
                        ", ".join(f"{k}={v}" for k, v in overrides.items())))
  for r in runs:
    r.arm = r.name
    try:
      config_lib.validate(r.cfg)
    except config_lib.ConfigError as e:
      raise config_lib.ConfigError(f"run {r.name!r}: {e}") from None
  if seeds > 1:
    runs = [dataclasses.replace(r, name=f"{r.arm}/seed_{i}", seed=i, cfg=_with(r.cfg, {
        "data.shuffle_seed": config_lib.order_seed(r.cfg) + i, "train.seed": r.cfg.train.seed + i}))
        for r in runs for i in range(seeds)]
  for r in runs:
    r.workdir = os.path.join(out_dir, r.name)
  return runs


# -------------------------------------------------------------------- report

def _mean_last(values: list[float]) -> float | None:
  values = [v for v in values if v is not None and math.isfinite(v)]
  if not values:
    return None
  k = max(1, math.ceil(LAST_FRACTION * len(values)))
  return sum(values[-k:]) / k


def final_metrics(run_dir: str) -> dict[str, Any]:
  """Final numbers of one run from its metrics.jsonl."""
  records = sorted(plot.read_records(run_dir), key=lambda r: r["step"])
  by_kind = lambda kind: [r for r in records if r.get("kind") == kind]
  trains, evals, probes = by_kind("train"), by_kind("eval"), by_kind("probe")
  last_eval = evals[-1] if evals else {}
  last_probe = probes[-1] if probes else {}
  has_nitp = any("nitp" in r for r in trains)
  return {
      "step": trains[-1]["step"] if trains else 0,
      "train_ntp": _mean_last([r["ntp"] for r in trains]),
      "heldout_loss": last_eval.get("ntp"), "heldout_ppl": last_eval.get("ppl"),
      **_per_source_losses(last_eval),
      "heldout_tokens": last_eval.get("tokens"), "eval_step": last_eval.get("step"),
      "train_nitp": _mean_last([r.get("nitp") for r in trains]) if has_nitp else None,
      "heldout_nitp": last_eval.get("nitp"),
      **{k: last_probe.get(k) for k in ("erank_last", "cos_last", "erank_target",
                                        "cos_target")},
      "probe_step": last_probe.get("step"),
      **{k: v for k, v in last_eval.items() if k.endswith(("/acc", "/acc_norm"))},
  }


PER_SOURCE = re.compile(r"ntp_s(\d+)")   # a mixture's per-source eval keys
PER_SOURCE_KEY = re.compile(r"heldout_loss_s(\d+)")   # their final_metrics keys


def _per_source_losses(record: dict[str, Any]) -> dict[str, float]:
  """`heldout_loss_s<i>`: each source's held-out loss of a mixture's eval
  record (its `ntp_s<i>`, nitp_jax.data.heldout_sets), in source order."""
  found = {int(m[1]): v for k, v in record.items() if (m := PER_SOURCE.fullmatch(k))}
  return {f"heldout_loss_s{i}": found[i] for i in sorted(found)}


COLUMNS = (("train NTP", "train_ntp", "{:.4f}"), ("held-out loss", "heldout_loss", "{:.4f}"),
           ("held-out ppl", "heldout_ppl", "{:.2f}"), ("NITP loss", "train_nitp", "{:.4f}"),
           ("erank last", "erank_last", "{:.1f}"), ("cos last", "cos_last", "{:.3f}"),
           ("erank target", "erank_target", "{:.1f}"))
TASK_FORMAT = "{:.3f}"


def _columns(rows: list[dict]) -> list[tuple[str, str, str]]:
  """COLUMNS with one per source's held-out loss after the held-out ones (a
  mixture), plus one per downstream task metric the runs logged."""
  sources = sorted({int(m[1]) for r in rows for k in r if (m := PER_SOURCE_KEY.fullmatch(k))})
  tasks = sorted({k for r in rows for k in r if k.endswith(("/acc", "/acc_norm"))})
  at = [c[1] for c in COLUMNS].index("heldout_ppl") + 1
  return (list(COLUMNS[:at]) + [(f"held-out s{i}", f"heldout_loss_s{i}", "{:.4f}")
                                for i in sources]
          + list(COLUMNS[at:]) + [(k, k, TASK_FORMAT) for k in tasks])


def _fmt(value: Any, fmt: str, std: float | None = None) -> str:
  if value is None or not math.isfinite(value):
    return "–"
  return fmt.format(value) + (f" ± {fmt.format(std)}" if std is not None else "")


def markdown_table(rows: list[dict]) -> str:
  """One row per run, or per arm (mean ± std) when rows carry `<key>_std`."""
  columns = _columns(rows)
  head = ["run", "changes", "steps"] + [c[0] for c in columns]
  if any("seeds" in r for r in rows):
    head.insert(3, "seeds")
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [r["run"], r["changes"], str(r["step"])]
    if "seeds" in r:
      cells.append(str(r["seeds"]))
    cells += [_fmt(r.get(k), f, r.get(f"{k}_std")) for _, k, f in columns]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def aggregate(rows: list[dict], runs: Sequence[RunSpec]) -> list[dict]:
  """Per arm: the mean and (population) std over its seeds of every metric."""
  arms: dict[str, list[dict]] = {}
  for row, r in zip(rows, runs):
    arms.setdefault(r.arm, []).append(row)
  out = []
  for arm, group in arms.items():
    agg = {"run": arm, "changes": group[0]["changes"], "seeds": len(group),
           "step": min(g["step"] for g in group)}
    for _, key, _ in _columns(rows):
      values = [g.get(key) for g in group]
      if values and all(v is not None and math.isfinite(v) for v in values):
        agg[key], agg[f"{key}_std"] = float(np.mean(values)), float(np.std(values))
      else:
        agg[key] = None
    out.append(agg)
  return out


def _direction(a: float, b: float) -> str:
  return "higher" if a > b else "lower" if a < b else "equal"


def summary_line(rows: list[dict]) -> str:
  """One sentence comparing NITP with NTP on the table's numbers."""
  by = {r["run"]: r for r in rows}
  a, b = by.get("nitp"), by.get("ntp")
  keys = ("heldout_loss", "erank_last", "cos_last")
  if not a or not b or any(a[k] is None or b[k] is None for k in keys):
    return "Not enough logged metrics to compare NITP with NTP."
  d = a["heldout_loss"] - b["heldout_loss"]
  return (f"NITP vs NTP after {a['step']} steps on identical data: held-out loss "
          f"{a['heldout_loss']:.4f} vs {b['heldout_loss']:.4f} ({d:+.4f} nats/token); "
          f"last-hidden effective rank {a['erank_last']:.1f} vs {b['erank_last']:.1f} "
          f"({_direction(a['erank_last'], b['erank_last'])}); mean pairwise cosine "
          f"{a['cos_last']:.3f} vs {b['cos_last']:.3f} "
          f"({_direction(a['cos_last'], b['cos_last'])}).")


def seed_summary(rows: list[dict], runs: Sequence[RunSpec]) -> str:
  """The NITP − NTP held-out difference per seed, as mean ± std, and whether
  it is larger than its spread over the seeds."""
  loss = {(r.arm, r.seed): row["heldout_loss"] for row, r in zip(rows, runs)}
  seeds = sorted({r.seed for r in runs})
  diffs = [loss[("nitp", s)] - loss[("ntp", s)] for s in seeds
           if loss.get(("nitp", s)) is not None and loss.get(("ntp", s)) is not None]
  if len(diffs) < 2:
    return "Not enough seeds with held-out losses to compare NITP with NTP."
  mean, std = float(np.mean(diffs)), float(np.std(diffs))
  verdict = ("larger than its spread over the seeds" if abs(mean) > std else
             "within the seed noise: no difference can be claimed")
  return (f"NITP − NTP held-out loss over {len(diffs)} seeds (same data order and init per "
          f"seed): {mean:+.4f} ± {std:.4f} nats/token; per seed "
          f"{', '.join(f'{d:+.4f}' for d in diffs)}. The mean difference is {verdict}.")


def _per_source_note(rows: list[dict], runs: Sequence[RunSpec]) -> str:
  """What the held-out s<i> columns are, when the runs logged them."""
  if not any(PER_SOURCE_KEY.fullmatch(k) for r in rows for k in r):
    return ""
  specs = config_lib.data_sources(runs[0].cfg)
  names = ", ".join(f"s{i} = {spec}" for i, spec in enumerate(specs))
  return (f"held-out s<i>: the held-out loss on source i of data.input ({names}), of "
          "which the held-out loss is the weighted mean (README: Held-out loss of a "
          "mixture). ")


def write_report(out_dir: str, runs: Sequence[RunSpec], figure: str) -> dict:
  """report.md and report.json in out_dir; returns the report dict."""
  rows = [{"run": r.name, "changes": r.changes, "workdir": r.workdir,
           **final_metrics(r.workdir)} for r in runs]
  several = len({r.seed for r in runs}) > 1
  table = aggregate(rows, runs) if several else rows
  summary = seed_summary(rows, runs) if several else summary_line(rows)
  notes = (f"train NTP / NITP loss: mean over the last {LAST_FRACTION:.0%} of logged training "
           "steps; held-out loss / ppl: the last eval (per token of the validation split; "
           "a mixture's is the weighted mean over its sources); "
           "erank / cos: effective rank and mean pairwise cosine of the last hidden states "
           "(target: the states after block k) on the held-out probe batch at the last "
           "probe step; <task>/acc, /acc_norm: downstream accuracy at the last eval. " +
           _per_source_note(rows, runs) + "All runs: same prepared data" +
           (", data.seed and train.seed." if not several else
            "; seed i shifts the data order and the init of every arm alike; ± is the "
            "standard deviation over the seeds."))
  md = "\n\n".join(["# NTP vs NITP comparison", markdown_table(table), summary,
                    notes, f"![curves]({os.path.basename(figure)})"]) + "\n"
  with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
    f.write(md)
  report = {"runs": rows, "summary": summary, "figure": figure}
  if several:
    report["arms"] = table
  with open(os.path.join(out_dir, "report.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2, ensure_ascii=False)
    f.write("\n")
  return report


# ---------------------------------------------------------------------- run

def compare(cfg: ml_collections.ConfigDict, out_dir: str, ablations: Sequence[str] = (),
            log: Callable[[str], None] = print, seeds: int = 1) -> dict:
  """Train every run (resuming), then write the figure and the report."""
  runs = plan_runs(cfg, out_dir, ablations, seeds)
  os.makedirs(out_dir, exist_ok=True)
  for i, r in enumerate(runs, 1):
    log(f"== run {i}/{len(runs)}: {r.name} ({r.changes}) in {r.workdir}")
    train.run(r.cfg, r.workdir)
  figure = os.path.join(os.path.abspath(out_dir), "compare.png")
  groups: dict[str, list[str]] = {}
  for r in runs:
    groups.setdefault(r.arm, []).append(r.workdir)
  seeds_text = f", {seeds} seeds (mean ± std)" if seeds > 1 else ", identical data and seeds"
  plot.plot_groups(groups, figure, title=f"NTP vs NITP, {cfg.train.steps} steps{seeds_text}")
  return write_report(os.path.abspath(out_dir), runs, figure)


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  report = compare(f.config, f.out, f.ablation, seeds=f.seeds)
  print("\n" + markdown_table(report.get("arms", report["runs"])) + "\n\n" + report["summary"])
  out = os.path.abspath(f.out)
  print(f"\nwrote {report['figure']}, {out}/report.md, {out}/report.json")


def define_flags() -> None:
  cli.define_config_flag("Config of the NITP run, e.g. configs/tiny.py; --config.x.y=v "
                         "overrides apply to every run.")
  flags.DEFINE_string("out", None, "Report folder: one subfolder per run, compare.png, "
                      "report.md, report.json.")
  flags.DEFINE_multi_string("ablation", [], "NAME:field=value[,field=value...]: an extra "
                            "run, the NITP config with these overrides.")
  flags.DEFINE_integer("seeds", 1, "Runs per arm, seed i shifting the data order and init "
                       "by i; the report shows mean ± std over them.")
  flags.mark_flags_as_required(["config", "out"])


if __name__ == "__main__":
  cli.run_main(main, define_flags, usage="--config=FILE --out=DIR [--seeds=N] "
               "[--ablation=NAME:field=value,...]",
               flag_names={"workdir": "--out"})  # each arm's workdir is under --out
