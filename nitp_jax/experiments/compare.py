"""NTP vs NITP (and ablations) with identical data order and seeds.

  python -m nitp_jax.experiments.compare --config=configs/tiny.py --out=DIR \
      [--ablation=k0:nitp.target_layer=0] [--ablation=nosg:nitp.stop_gradient=false] \
      [--config.train.steps=N ...]

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
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Callable, Sequence

import ml_collections
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
  name: str
  cfg: ml_collections.ConfigDict
  changes: str            # what differs from the NITP config, in words
  workdir: str = ""


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


def plan_runs(cfg: ml_collections.ConfigDict, out_dir: str, ablations: Sequence[str]
              ) -> list[RunSpec]:
  """The runs (ntp, nitp, ablations), each config validated, sharing data."""
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
    r.workdir = os.path.join(out_dir, r.name)
    try:
      config_lib.validate(r.cfg)
    except config_lib.ConfigError as e:
      raise config_lib.ConfigError(f"run {r.name!r}: {e}") from None
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
      "heldout_tokens": last_eval.get("tokens"), "eval_step": last_eval.get("step"),
      "train_nitp": _mean_last([r.get("nitp") for r in trains]) if has_nitp else None,
      "heldout_nitp": last_eval.get("nitp"),
      **{k: last_probe.get(k) for k in ("erank_last", "cos_last", "erank_target",
                                        "cos_target")},
      "probe_step": last_probe.get("step"),
  }


COLUMNS = (("train NTP", "train_ntp", "{:.4f}"), ("held-out loss", "heldout_loss", "{:.4f}"),
           ("held-out ppl", "heldout_ppl", "{:.2f}"), ("NITP loss", "train_nitp", "{:.4f}"),
           ("erank last", "erank_last", "{:.1f}"), ("cos last", "cos_last", "{:.3f}"),
           ("erank target", "erank_target", "{:.1f}"))


def _fmt(value: Any, fmt: str) -> str:
  return "–" if value is None or not math.isfinite(value) else fmt.format(value)


def markdown_table(rows: list[dict]) -> str:
  head = ["run", "changes", "steps"] + [c[0] for c in COLUMNS]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [r["run"], r["changes"], str(r["step"])] + [_fmt(r[k], f) for _, k, f in COLUMNS]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


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


def write_report(out_dir: str, runs: Sequence[RunSpec], figure: str) -> dict:
  """report.md and report.json in out_dir; returns the report dict."""
  rows = [{"run": r.name, "changes": r.changes, "workdir": r.workdir,
           **final_metrics(r.workdir)} for r in runs]
  summary = summary_line(rows)
  notes = (f"train NTP / NITP loss: mean over the last {LAST_FRACTION:.0%} of logged training "
           "steps; held-out loss / ppl: the last eval (validation split, token-weighted); "
           "erank / cos: effective rank and mean pairwise cosine of the last hidden states "
           "(target: the states after block k) on the held-out probe batch at the last "
           "probe step. All runs: same prepared data, data.seed and train.seed.")
  md = "\n\n".join(["# NTP vs NITP comparison", markdown_table(rows), summary,
                    notes, f"![curves]({os.path.basename(figure)})"]) + "\n"
  with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
    f.write(md)
  report = {"runs": rows, "summary": summary, "figure": figure}
  with open(os.path.join(out_dir, "report.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2, ensure_ascii=False)
    f.write("\n")
  return report


# ---------------------------------------------------------------------- run

def compare(cfg: ml_collections.ConfigDict, out_dir: str, ablations: Sequence[str] = (),
            log: Callable[[str], None] = print) -> dict:
  """Train every run (resuming), then write the figure and the report."""
  runs = plan_runs(cfg, out_dir, ablations)
  os.makedirs(out_dir, exist_ok=True)
  for i, r in enumerate(runs, 1):
    log(f"== run {i}/{len(runs)}: {r.name} ({r.changes}) in {r.workdir}")
    train.run(r.cfg, r.workdir)
  figure = os.path.join(os.path.abspath(out_dir), "compare.png")
  plot.plot_runs([r.workdir for r in runs], figure,
                 title=f"NTP vs NITP, {cfg.train.steps} steps, identical data and seeds")
  return write_report(os.path.abspath(out_dir), runs, figure)


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  report = compare(f.config, f.out, f.ablation)
  print("\n" + markdown_table(report["runs"]) + "\n\n" + report["summary"])
  out = os.path.abspath(f.out)
  print(f"\nwrote {report['figure']}, {out}/report.md, {out}/report.json")


def define_flags() -> None:
  cli.define_config_flag("Config of the NITP run, e.g. configs/tiny.py; --config.x.y=v "
                         "overrides apply to every run.")
  flags.DEFINE_string("out", None, "Report folder: one subfolder per run, compare.png, "
                      "report.md, report.json.")
  flags.DEFINE_multi_string("ablation", [], "NAME:field=value[,field=value...]: an extra "
                            "run, the NITP config with these overrides.")
  flags.mark_flags_as_required(["config", "out"])


if __name__ == "__main__":
  cli.run_main(main, define_flags, usage="--config=FILE --out=DIR "
               "[--ablation=NAME:field=value,...]")
