"""The scores as a table for the terminal and as JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from nnsam_core.errors import NNSAMError


def write_json(report: dict, path: str | Path) -> None:
    """Write the report as strict JSON (NaN as null, label values as string keys)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_jsonable(report), indent=2, allow_nan=False) + "\n")
    except OSError as error:
        raise NNSAMError(f"cannot write {path} ({error.strerror}); choose a writable --json path") from None


def format_table(report: dict, show_cases: bool = False) -> str:
    """Readable summary table (and per-case rows if ``show_cases``)."""
    classes = report["classes"]
    labels = {v: f"{v} {name}" if name else str(v) for v, name in classes.items()}
    width = max(len("class"), *(len(label) for label in labels.values()))
    counted = f"{report['n_cases']} case(s)"
    if report["scoring"].startswith("2D per slice"):
        counted += f", {report['n_items']} slice(s) scored"
    lines = [f"{counted}; {report['scoring']}"]
    if show_cases:
        for record in report["cases"]:
            for score in record["scores"]:
                where = record["case"] if score["slice"] is None else f"{record['case']} k={score['slice']}"
                cells = [
                    f"{labels[v]}: Dice {_num(s['dice'])} ASD {_num(s['asd_mm'])}" for v, s in score["classes"].items()
                ]
                lines.append(f"  {where}: " + "; ".join(cells))
    lines.append(
        f"{'class':<{width}}  {'scored':>6}  {'Dice % mean ± sd':>18}  {'ASD mm mean ± sd':>18}  "
        f"{'both empty':>10}  {'one empty':>9}"
    )
    for value, entry in report["summary"].items():
        lines.append(
            f"{labels[value]:<{width}}  {entry['dice']['n']:>6}  {_fmt_mean_sd(entry['dice']):>18}  "
            f"{_fmt_mean_sd(entry['asd_mm']):>18}  {entry['n_both_empty']:>10}  {entry['n_one_empty']:>9}"
        )
    means = report["mean_over_classes"]
    lines.append(
        f"{'mean':<{width}}  {'':>6}  {_num(means['dice']):>18}  {_num(means['asd_mm']):>18}  (of the class means)"
    )
    lines.append("Empty masks: both empty -> not scored; one empty -> Dice 0, ASD left out of the mean.")
    if report["gt_without_prediction"]:
        lines.append(f"Not scored (ground truth without prediction): {len(report['gt_without_prediction'])} cases")
    return "\n".join(lines)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _num(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}"


def _fmt_mean_sd(stats: dict) -> str:
    if stats["n"] == 0:
        return "n/a"
    sd = "-" if math.isnan(stats["sd"]) else f"{stats['sd']:.2f}"
    return f"{stats['mean']:.2f} ± {sd}"


def format_numbers(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"
