"""Tables, CSV and figures from the finished runs of one report folder (rewritten after every run).

Aggregation (stated in every report):
- a slice's headline score is the mean over the headline classes scored on it (Dice NaN when a class is absent
  from both prediction and ground truth, so it is not scored; absent from one: Dice 0, ASD not scored);
- an *item* is a test slice (labelled-slices protocol) or a volume (in-volume protocol: the mean over its
  scored slices);
- table cells are mean ± sample SD over items, pooled over seeds.

In-volume reports lead with the clinician's measure: per volume, the 3D Dice of each structure over all its scored
(labelled, not annotated) slices, their voxels pooled, then the mean over the headline structures, then mean ± SD
over volumes. The per-slice 2D mean stands beside it: it scores a stray blob on a slice where a structure is absent
as 0 for that slice, while the pooled 3D Dice weighs it by its voxels. Both are also split into the slices between
the first and last annotated slice and those outside them, where filling between slices gives nothing.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .splits import Unit

METRICS = (("dice", "Dice (%)"), ("asd_mm", "ASD (mm)"))
METHOD_ORDER = ("fill-between", "nnsam", "nnunet", "nnsam-random", "nnsam-recomputed", "base-model", "adapt",
                "adapt-chained")
METHOD_LABELS = {"nnsam": "nnSAM", "nnunet": "nnU-Net", "nnsam-random": "nnSAM (random encoder)",
                 "nnsam-recomputed": "nnSAM (embeddings recomputed every step)",
                 "fill-between": "Fill between slices", "base-model": "Saved model alone",
                 "adapt": "Adapted from the saved model", "adapt-chained": "Adapted from the previous volume's"}
BASELINE = "fill-between"     # the clinician's baseline, every in-volume method is compared with it
REGIONS = ("all", "inside", "outside")


def load_runs(report_dir: Path) -> list[dict]:
    runs = []
    for path in sorted((Path(report_dir) / "runs").glob("**/metrics.json")):
        data = json.loads(path.read_text())
        data["_dir"] = str(path.parent)
        runs.append(data)
    return runs


def _nanmean(values) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _mean_sd(values) -> tuple[float, float, int]:
    finite = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if finite.size == 0:
        return float("nan"), float("nan"), 0
    return float(finite.mean()), float(finite.std(ddof=1)) if finite.size > 1 else float("nan"), int(finite.size)


def _fmt(stats: tuple[float, float, int]) -> str:
    mean, sd, n = stats
    if n == 0:
        return "–"
    return f"{mean:.2f} ± {sd:.2f}" if not math.isnan(sd) else f"{mean:.2f}"


def methods_in(runs: Sequence[dict]) -> list[str]:
    found = {r["method"] for r in runs}
    return [m for m in METHOD_ORDER if m in found] + sorted(found - set(METHOD_ORDER))


class _RunsView:
    """What both result views tell about their runs: the methods and the sizes (k) they hold."""

    runs: list

    @property
    def methods(self) -> list[str]:
        return methods_in(self.runs)

    @property
    def sizes(self) -> list[int]:
        return sorted({r["size"] for r in self.runs})


class Results(_RunsView):
    """Item-level scores: (method, size, seed, item) -> {class value: {metric: value}}, plus headline."""

    def __init__(self, runs: Sequence[dict], class_names: Sequence[str], headline: Sequence[str],
                 patients: Optional[dict] = None):
        self.runs = list(runs)
        self.patients = dict(patients or {})  # item -> patient, where items are slices of known patients
        self.class_names = list(class_names)
        self.values = {name: str(i) for i, name in enumerate(class_names, start=1)}
        self.headline = [self.values[c] for c in headline]
        self.items: dict[tuple, dict] = {}
        for run in self.runs:
            by_item = defaultdict(list)
            for score in run["scores"]:
                by_item[score["item"]].append(score["classes"])
            for item, slices in by_item.items():
                entry = {}
                for metric, _ in METRICS:
                    per_class = {v: _nanmean([s[v][metric] for s in slices]) for v in self.values.values()}
                    # headline per slice first (mean over its classes), then over the item's slices
                    head = _nanmean([_nanmean([s[v][metric] for v in self.headline]) for s in slices])
                    entry[metric] = {**per_class, "headline": head}
                self.items[(run["method"], run["size"], run["seed"], item)] = entry


    def cell(self, method: str, size: int, metric: str, key: str = "headline") -> tuple[float, float, int]:
        return _mean_sd([e[metric][key] for (m, n, _, _), e in self.items.items() if m == method and n == size])

    def seed_means(self, method: str, size: int, metric: str = "dice") -> dict[int, float]:
        """seed -> the headline mean over that seed's items: one number per training run (over volumes in the
        in-volume protocol), whose spread across seeds is the seed noise."""
        by_seed = defaultdict(list)
        for (m, n, seed, _), entry in self.items.items():
            if m == method and n == size:
                by_seed[seed].append(entry[metric]["headline"])
        return {seed: _nanmean(values) for seed, values in sorted(by_seed.items())}

    def paired(self, method: str, baseline: str, size: int, metric: str = "dice") -> Optional[dict]:
        """Per (seed, item) differences method - baseline, on the items both have; with patients known, also how
        many patients the method is better or worse on (mean difference over each patient's items): slices of one
        patient are not independent, so this count is the sounder one."""
        diffs, by_patient = [], defaultdict(list)
        for (m, n, seed, item), entry in self.items.items():
            if m != method or n != size:
                continue
            other = self.items.get((baseline, n, seed, item))
            if other is None:
                continue
            a, b = entry[metric]["headline"], other[metric]["headline"]
            if not (math.isnan(a) or math.isnan(b)):
                diffs.append(a - b)
                if item in self.patients:
                    by_patient[self.patients[item]].append(a - b)
        if not diffs:
            return None
        mean, sd, n = _mean_sd(diffs)
        per_patient = [float(np.mean(d)) for d in by_patient.values()]
        return {"mean": mean, "sd": sd, "n": n, "better": sum(d > 0 for d in diffs),
                "worse": sum(d < 0 for d in diffs), "patients": len(per_patient),
                "patients_better": sum(d > 0 for d in per_patient), "patients_worse": sum(d < 0 for d in per_patient)}


# --------------------------------------------------------------------------------------------- in-volume scores
def _intersection(c: dict) -> int:
    """Voxels a slice's prediction and ground truth share for one class, from its Dice and the two voxel counts
    (Dice = 200 |P ∩ G| / (|P| + |G|), recorded at full precision), so report folders written before this measure
    existed are read as they are."""
    total = c["gt_voxels"] + c["pred_voxels"]
    if total == 0 or c["dice"] is None or math.isnan(c["dice"]):
        return 0
    return int(round(c["dice"] * total / 200.0))


def slice_region(k: int, annotated: Sequence[int]) -> str:
    """"inside" for a slice strictly between the first and last annotated slice, else "outside"."""
    return "inside" if min(annotated) < k < max(annotated) else "outside"


def volume_scores(run: dict, values: Sequence[str], headline: Sequence[str]) -> dict:
    """One in-volume run's scores per region (all scored slices, inside and outside the annotated range).

    ``dice3d[region][value]``: 3D Dice of one structure over the region's slices, voxels pooled (NaN when the
    structure is in neither prediction nor ground truth there); ``dice3d[region]["headline"]``: its mean over the
    headline structures. ``dice2d[region]``: the per-slice 2D mean over the headline structures, then over the
    region's slices. ``counts[region][value]``: pooled (gt, pred, intersection) voxels."""
    pooled = {r: {v: [0, 0, 0] for v in values} for r in REGIONS}
    per_slice = {r: [] for r in REGIONS}
    slices = {r: 0 for r in REGIONS}
    for score in run["scores"]:
        region = slice_region(score["k"], run["annotated_slices"])
        for r in ("all", region):
            slices[r] += 1
            per_slice[r].append(_nanmean([score["classes"][v]["dice"] for v in headline]))
            for v in values:
                c = score["classes"][v]
                counts = pooled[r][v]
                counts[0] += c["gt_voxels"]
                counts[1] += c["pred_voxels"]
                counts[2] += _intersection(c)
    dice3d = {}
    for r in REGIONS:
        per_class = {v: (200.0 * i / (g + p) if g + p else float("nan")) for v, (g, p, i) in pooled[r].items()}
        dice3d[r] = {**per_class, "headline": _nanmean([per_class[v] for v in headline])}
    return {"dice3d": dice3d, "dice2d": {r: _nanmean(per_slice[r]) for r in REGIONS}, "slices": slices,
            "counts": pooled}


class VolumeResults(_RunsView):
    """In-volume scores per run: (method, k, seed, volume) -> :func:`volume_scores`, plus each run's time."""

    def __init__(self, runs: Sequence[dict], class_names: Sequence[str], headline: Sequence[str]):
        self.runs = [r for r in runs if r.get("protocol") == "in-volume"]
        self.class_names = list(class_names)
        self.values = {name: str(i) for i, name in enumerate(class_names, start=1)}
        self.headline = [self.values[c] for c in headline]
        self.entries = {(r["method"], r["size"], r["seed"], r["volume"]):
                        volume_scores(r, list(self.values.values()), self.headline) for r in self.runs}
        self.times = {(r["method"], r["size"], r["seed"], r["volume"]):
                      (float(r["train_seconds"]), float(r["predict_seconds"])) for r in self.runs}


    @property
    def volumes(self) -> list[str]:
        return sorted({r["volume"] for r in self.runs})

    def value(self, key: tuple, metric: str, region: str = "all", cls: str = "headline") -> float:
        entry = self.entries[key]
        return entry["dice3d"][region][cls] if metric == "dice3d" else entry["dice2d"][region]

    def cell(self, method: str, k: int, metric: str, region: str = "all", cls: str = "headline"
             ) -> tuple[float, float, int]:
        """mean ± SD over volumes (pooled over seeds); volumes with no slice in ``region`` are left out."""
        return _mean_sd([self.value(key, metric, region, cls) for key in self.entries
                         if key[0] == method and key[1] == k and self.entries[key]["slices"][region]])

    def slice_count(self, method: str, k: int, region: str) -> int:
        return sum(e["slices"][region] for key, e in self.entries.items() if key[0] == method and key[1] == k)

    def paired(self, method: str, baseline: str, k: int, metric: str, region: str = "all") -> Optional[dict]:
        """Per (seed, volume) differences method - baseline on the volumes both scored."""
        diffs = []
        for key in self.entries:
            if key[0] != method or key[1] != k:
                continue
            other = (baseline, *key[1:])
            if other not in self.entries or not self.entries[key]["slices"][region]:
                continue
            a, b = self.value(key, metric, region), self.value(other, metric, region)
            if not (math.isnan(a) or math.isnan(b)):
                diffs.append(a - b)
        if not diffs:
            return None
        mean, sd, n = _mean_sd(diffs)
        return {"mean": mean, "sd": sd, "n": n, "better": sum(d > 0 for d in diffs),
                "worse": sum(d < 0 for d in diffs)}

    def time_cell(self, method: str, k: int) -> dict:
        chosen = [t for key, t in self.times.items() if key[0] == method and key[1] == k]
        return {"train": _mean_sd([t[0] for t in chosen]), "segment": _mean_sd([t[1] for t in chosen]),
                "total": _mean_sd([t[0] + t[1] for t in chosen]), "runs": len(chosen)}


def write_volume_csv(path: Path, results: VolumeResults) -> None:
    """Every in-volume run's 3D Dice per structure and region, with the pooled voxel counts."""
    names = {v: n for n, v in results.values.items()}
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "annotated", "seed", "volume", "region", "slices", "class_value", "class",
                         "dice3d", "gt_voxels", "pred_voxels", "intersection_voxels", "dice2d_slice_mean_headline",
                         "train_seconds", "segment_seconds"])
        for key in sorted(results.entries, key=lambda k: (k[1], k[2], _method_rank(k[0]), k[3])):
            entry = results.entries[key]
            train, segment = results.times[key]
            for region in REGIONS:
                for value, (g, p, i) in entry["counts"][region].items():
                    writer.writerow([*key, region, entry["slices"][region], value, names[value],
                                     _csv_num(entry["dice3d"][region][value]), g, p, i,
                                     _csv_num(entry["dice2d"][region]), f"{train:.3f}", f"{segment:.3f}"])


def _method_rank(method: str) -> int:
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def write_csv(path: Path, runs: Sequence[dict], class_names: Sequence[str]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["protocol", "method", "size", "seed", "item", "unit", "case", "slice", "class_value",
                         "class", "dice", "asd_mm", "gt_voxels", "pred_voxels"])
        for run in runs:
            for score in run["scores"]:
                for value, c in score["classes"].items():
                    writer.writerow([run["protocol"], run["method"], run["size"], run["seed"], score["item"],
                                     score["unit"], score["case"], "" if score["k"] is None else score["k"], value,
                                     class_names[int(value) - 1], _csv_num(c["dice"]), _csv_num(c["asd_mm"]),
                                     c["gt_voxels"], c["pred_voxels"]])


def _csv_num(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


# --------------------------------------------------------------------------------------------- figures
def plot_curves(path: Path, results: Results, size_label: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    span = (max(results.sizes) - min(results.sizes)) or 4
    for index, method in enumerate(results.methods):
        sizes = [n for n in results.sizes if results.cell(method, n, "dice")[2]]
        # a small horizontal offset per method keeps overlapping error bars readable
        shift = (index - (len(results.methods) - 1) / 2) * 0.02 * span
        for ax, (metric, label) in zip(axes, METRICS):
            stats = [results.cell(method, n, metric) for n in sizes]
            means = [s[0] for s in stats]
            sds = [0 if math.isnan(s[1]) else s[1] for s in stats]
            ax.errorbar([n + shift for n in sizes], means, yerr=sds, marker="o", capsize=3, label=METHOD_LABELS.get(method, method))
            ax.set_xlabel(size_label)
            ax.set_ylabel(f"mean {label}")
            ax.set_xticks(results.sizes)
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[0].set_title("Dice (higher is better)", fontsize=9)
    axes[1].set_title("ASD (lower is better)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_examples(path: Path, rows: Sequence[dict], class_names: Sequence[str]) -> None:
    """rows: {"title", "image" (2D array), "gt", "preds": [(label, 2D array)]}; image, GT, then each method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    colours = [plt.get_cmap("tab10")(i % 10) for i in range(len(class_names))]
    cmap = ListedColormap(colours)
    n_cols = 2 + len(rows[0]["preds"])
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(1.8 * n_cols, 1.8 * len(rows) + 0.4), squeeze=False)
    for r, row in enumerate(rows):
        image = row["image"]
        lo, hi = np.percentile(image, [1, 99])
        panels = [("image", None), ("ground truth", row["gt"])] + list(row["preds"])
        for c, (title, labels) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            if labels is not None:
                ax.imshow(np.ma.masked_equal(labels, 0), cmap=cmap, vmin=0.5, vmax=len(class_names) + 0.5,
                          alpha=0.55, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=8)
        axes[r, 0].set_ylabel(row["title"], fontsize=7)
    fig.legend(handles=[Patch(color=colours[i], label=n) for i, n in enumerate(class_names)],
               loc="lower center", ncol=min(len(class_names), 8), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1), pad=0.3, w_pad=0.2, h_pad=0.2)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _has_case(data: Path, case: str) -> bool:
    return (data / "imagesTr" / f"{case}_0000.nii.gz").is_file() and (data / "labelsTr" / f"{case}.nii.gz").is_file()


def _example_rows(report_dir: Path, state: dict, runs: Sequence[dict], results: Results, protocol: str,
                  max_rows: int = 3) -> tuple[list[dict], int, int]:
    """A few test slices at the smallest size (first seed) that every method finished."""
    import SimpleITK as sitk

    sizes = [n for n in results.sizes
             if all(any(r["method"] == m and r["size"] == n for r in runs) for m in results.methods)]
    if not sizes:
        return [], 0, 0
    size = sizes[0]
    chosen = [r for r in runs if r["size"] == size]
    seed = min(r["seed"] for r in chosen)
    by_method = {m: [r for r in chosen if r["method"] == m and r["seed"] == seed] for m in results.methods}
    if not all(by_method.values()):
        return [], size, seed
    data = report_dir / "data"
    rows = []
    if protocol == "slices":
        test = by_method[results.methods[0]][0]["test_units"]
        picks = [test[int((i + 0.5) * len(test) / min(max_rows, len(test)))] for i in range(min(max_rows, len(test)))]
        for unit in picks:
            if not _has_case(data, unit):
                return [], size, seed  # a report folder copied without its data/: no examples figure
            image = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "imagesTr" / f"{unit}_0000.nii.gz")))[0]
            gt = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "labelsTr" / f"{unit}.nii.gz")))[0]
            preds = []
            for m in results.methods:
                pred_file = Path(by_method[m][0]["_dir"]) / "predictions" / f"{unit}.nii.gz"
                if not pred_file.is_file():
                    return [], size, seed
                preds.append((f"{METHOD_LABELS.get(m, m)}", sitk.GetArrayFromImage(sitk.ReadImage(str(pred_file)))[0]))
            rows.append({"title": unit, "image": image, "gt": gt, "preds": preds})
        return rows, size, seed
    volumes = sorted(set.intersection(*({r["volume"] for r in rs} for rs in by_method.values())))
    for volume in volumes[:max_rows]:
        run0 = next(r for r in by_method[results.methods[0]] if r["volume"] == volume)
        scored = run0["scored_slices"]
        if not scored:
            continue
        k = scored[len(scored) // 2]
        if not _has_case(data, volume):
            return [], size, seed
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "imagesTr" / f"{volume}_0000.nii.gz")))[k]
        gt = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "labelsTr" / f"{volume}.nii.gz")))[k]
        preds = []
        for m in results.methods:
            run = next(r for r in by_method[m] if r["volume"] == volume)
            preds.append((METHOD_LABELS.get(m, m),
                          sitk.GetArrayFromImage(sitk.ReadImage(str(Path(run["_dir"]) / "prediction.nii.gz")))[k]))
        rows.append({"title": f"{volume} k={k} (annotated {run0['annotated_slices']})", "image": image, "gt": gt,
                     "preds": preds})
    return rows, size, seed


# --------------------------------------------------------------------------------------------- markdown
def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def headline_classes(state: dict, requested: Optional[Sequence[str]]) -> list[str]:
    if requested:
        return list(requested)
    for invocation in reversed(state.get("invocations", [])):
        if invocation.get("report_classes"):
            return list(invocation["report_classes"])
    return list(state["class_names"])


def write_report(report_dir, report_classes: Optional[Sequence[str]] = None) -> dict:
    """Write report.md, results.csv, dice_vs_size.png and examples.png; returns their paths."""
    report_dir = Path(report_dir)
    state = json.loads((report_dir / "benchmark.json").read_text())
    settings = state["settings"]
    protocol = settings["protocol"]
    class_names = state["class_names"]
    headline = headline_classes(state, report_classes)
    others = [c for c in class_names if c not in headline]
    runs = [r for r in load_runs(report_dir) if r["protocol"] == protocol]
    results = Results(runs, class_names, headline, patients=_test_patients(state))
    size_word = "training slices" if protocol == "slices" else "annotated slices per volume"
    item_word = "test slices" if protocol == "slices" else "volumes"
    paths = {"report": report_dir / "report.md", "csv": report_dir / "results.csv",
             "curves": report_dir / "dice_vs_size.png", "examples": report_dir / "examples.png"}
    write_csv(paths["csv"], runs, class_names)

    lines = [f"# nnSAM benchmark: {state['dataset_name']}, "
             + ("labelled-slices protocol" if protocol == "slices" else "in-volume protocol"), ""]
    lines += _setup_section(state, runs, protocol)
    if not runs:
        lines += ["", "No run has finished yet."]
        paths["report"].write_text("\n".join(lines) + "\n")
        return paths
    expected = _expected_runs(state, protocol)
    missing = sorted(expected - {(r["method"], r["size"], r["seed"]) + ((r["volume"],) if protocol != "slices" else ())
                                 for r in runs})
    if missing:
        lines += ["", f"**Partial results:** {len(missing)} requested run(s) have not finished: "
                  + ", ".join(" ".join(str(x) for x in m) for m in missing[:20])
                  + (" ..." if len(missing) > 20 else "")]

    sizes = results.sizes
    head = ", ".join(headline)
    if protocol != "slices":
        volume_results = VolumeResults(runs, class_names, headline)
        paths["volumes_csv"] = report_dir / "volumes.csv"
        write_volume_csv(paths["volumes_csv"], volume_results)
        lines += _in_volume_sections(volume_results, headline)
    lines += ["", f"## Table 1: mean over {head} ({item_word}; mean ± SD)"
              + ("; per-slice 2D scores" if protocol != "slices" else ""), ""]
    for metric, label in METRICS:
        lines += [f"**{label}**", ""]
        lines += _table(["Method"] + [f"{n} {'slices' if protocol == 'slices' else 'annotated'}" for n in sizes],
                        [[METHOD_LABELS.get(m, m)] + [_fmt(results.cell(m, n, metric)) for n in sizes]
                         for m in results.methods])
        lines.append("")
    lines += _paired_section(results, sizes)
    lines += _seed_section(results, sizes)

    for number, (metric, label) in zip((2, 3), METRICS):
        lines += [f"## Table {number}: {label} per class", ""]
        rows = [[str(n), METHOD_LABELS.get(m, m)] + [_fmt(results.cell(m, n, metric, results.values[c]))
                                                     for c in headline]
                for n in sizes for m in results.methods if results.cell(m, n, "dice")[2]]
        lines += _table(["size", "Method", *headline], rows) + [""]
    if others:
        lines += [f"## Other classes (not in the means above): {', '.join(others)}", ""]
        rows = [[str(n), METHOD_LABELS.get(m, m)] + [f"{_fmt(results.cell(m, n, 'dice', results.values[c]))} / "
                                                     f"{_fmt(results.cell(m, n, 'asd_mm', results.values[c]))}"
                                                     for c in others]
                for n in sizes for m in results.methods if results.cell(m, n, "dice")[2]]
        lines += _table(["size", "Method", *[f"{c} Dice % / ASD mm" for c in others]], rows) + [""]

    lines += ["## Runs", ""]
    run_rows = []
    for r in sorted(runs, key=lambda r: (r["size"], r["seed"], _method_rank(r["method"]), r.get("volume", ""))):
        items = {s["item"] for s in r["scores"]}
        head_dice = _nanmean([results.items[(r["method"], r["size"], r["seed"], i)]["dice"]["headline"]
                              for i in items])
        run_rows.append([METHOD_LABELS.get(r["method"], r["method"]), str(r["size"]), str(r["seed"]),
                         r.get("volume", "") or ", ".join(r["train_units"]), _or_dash(r["iterations"]),
                         _or_dash(r["batch_size"]), f"{r['train_seconds']:.0f}", f"{r['predict_seconds']:.1f}",
                         str(len(r["scores"])), f"{head_dice:.2f}"])
    lines += _table(["Method", "size", "seed", "volume" if protocol != "slices" else "training slices", "iterations",
                     "batch", "train s", "predict s", "slices scored", "mean Dice"], run_rows)

    try:
        plot_curves(paths["curves"], results, size_word)
        lines += ["", f"![mean Dice and ASD against the number of {size_word}]({paths['curves'].name})"]
    except Exception as exc:  # a figure must never lose the tables
        lines += ["", f"(curve plot failed: {exc})"]
    rows, size, seed = _example_rows(report_dir, state, runs, results, protocol)
    if rows:
        plot_examples(paths["examples"], rows, class_names)
        lines += ["", f"Examples ({size} {size_word}, seed {seed}; rows: {', '.join(r['title'] for r in rows)}):", "",
                  f"![test slices: image, ground truth, each method]({paths['examples'].name})"]
    lines += ["", "## Conventions", "",
              "- Dice in %, ASD (average symmetric surface distance) in mm from the image spacing, each test slice "
              "scored in 2D with `nnsam_core.evaluation.evaluate_case`.",
              "- A class absent from both prediction and ground truth of a slice is not scored; absent from one: "
              "Dice 0 and ASD not scored (no surface to measure to).",
              f"- Table cells: a slice's score is the mean over the classes in the table ({head} for Table 1); "
              f"an item is one of the {item_word}"
              + (" (the mean of its scored slices)" if protocol != "slices" else "")
              + "; mean ± sample SD over items, pooled over seeds.",
              "- Every method of one size and seed trained on the same slices with the same seed, preset and "
              "iteration count; test slices never trained anything and nothing was tuned on them.",
              f"- Every case and class: [{paths['csv'].name}]({paths['csv'].name})."]
    if protocol != "slices":
        lines += ["- 3D Dice per structure: for each volume and structure, 200 |P ∩ G| / (|P| + |G|) over the voxels "
                  "of all its scored slices pooled (a structure in neither is not scored); then the mean over "
                  f"{head}, then mean ± SD over volumes. Slices inside: strictly between the first and last "
                  "annotated slice; outside: the others. Every volume, structure and region: "
                  f"[{paths['volumes_csv'].name}]({paths['volumes_csv'].name}).",
                  "- Fill between slices: ITK's morphological contour interpolation of the annotated slices along "
                  "the slice axis (Slicer's effect), the annotated slices kept as painted; it trains nothing, so "
                  "its time is all segmentation."]
    paths["report"].write_text("\n".join(lines) + "\n")
    return paths


def _or_dash(value) -> str:
    return "–" if value is None else str(value)


def _in_volume_sections(vr: VolumeResults, headline: Sequence[str]) -> list[str]:
    """The in-volume report's lead: 3D Dice per structure beside the per-slice 2D mean, inside and outside the
    annotated range, every method against fill between slices, time per run, and the per-volume table."""
    head = ", ".join(headline)
    sizes, methods = vr.sizes, vr.methods
    lines = ["", f"## Headline: 3D Dice per structure over the unpainted labelled slices (%; mean over {head}, then "
             "mean ± SD over volumes)", "",
             "Beside it, the per-slice 2D mean (Table 1's Dice): the mean over the structures scored on each slice, "
             "then over the slices.", ""]
    header = ["Method"]
    for k in sizes:
        header += [f"{k} annotated: 3D Dice", f"{k} annotated: 2D per-slice"]
    rows = []
    for m in methods:
        row = [METHOD_LABELS.get(m, m)]
        for k in sizes:
            row += [_fmt(vr.cell(m, k, "dice3d")), _fmt(vr.cell(m, k, "dice2d"))]
        rows.append(row)
    lines += _table(header, rows) + [""]

    lines += ["### Inside and outside the annotated range", "",
              "Inside: slices strictly between the first and last annotated slice; outside: before the first or after "
              "the last (where filling between slices gives nothing). Mean ± SD over the volumes that have such "
              "slices.", ""]
    rows = []
    for k in sizes:
        for m in methods:
            rows.append([str(k), METHOD_LABELS.get(m, m),
                         f"{vr.slice_count(m, k, 'inside')} / {vr.slice_count(m, k, 'outside')}",
                         _fmt(vr.cell(m, k, "dice3d", "inside")), _fmt(vr.cell(m, k, "dice3d", "outside")),
                         _fmt(vr.cell(m, k, "dice2d", "inside")), _fmt(vr.cell(m, k, "dice2d", "outside"))])
    lines += _table(["annotated", "Method", "slices inside / outside", "3D Dice inside", "3D Dice outside",
                     "2D per-slice inside", "2D per-slice outside"], rows) + [""]

    if BASELINE in methods and len(methods) > 1:
        lines += ["### Paired differences against fill between slices (same volume, same seed)", "",
                  "Points of Dice, method minus fill between slices; better / worse counts volumes.", ""]
        rows = []
        for k in sizes:
            for m in methods:
                if m == BASELINE:
                    continue
                cells = []
                for metric in ("dice3d", "dice2d"):
                    for region in REGIONS:
                        p = vr.paired(m, BASELINE, k, metric, region)
                        cells.append("–" if p is None else
                                     f"{p['mean']:+.2f}" + ("" if math.isnan(p["sd"]) else f" ± {p['sd']:.2f}")
                                     + f" ({p['better']} / {p['worse']})")
                rows.append([str(k), METHOD_LABELS.get(m, m), *cells])
        lines += _table(["annotated", "Method", "3D Dice", "3D Dice inside", "3D Dice outside", "2D per-slice",
                         "2D per-slice inside", "2D per-slice outside"], rows) + [""]

    lines += ["### Time per run (seconds; training + segmentation of one volume, mean ± SD over runs)", ""]
    rows = []
    for k in sizes:
        for m in methods:
            t = vr.time_cell(m, k)
            if t["runs"]:
                rows.append([str(k), METHOD_LABELS.get(m, m), str(t["runs"]), _fmt_s(t["train"]),
                             _fmt_s(t["segment"]), _fmt_s(t["total"])])
    lines += _table(["annotated", "Method", "runs", "training s", "segmentation s", "total s"], rows) + [""]

    lines += ["### 3D Dice per structure (%; mean ± SD over volumes)", ""]
    classes = vr.class_names
    rows = [[str(k), METHOD_LABELS.get(m, m)] + [_fmt(vr.cell(m, k, "dice3d", cls=vr.values[c])) for c in classes]
            for k in sizes for m in methods if vr.cell(m, k, "dice3d")[2]]
    lines += _table(["annotated", "Method", *classes], rows) + [""]

    lines += ["### Per volume (3D Dice / 2D per-slice mean, %; first seed)", ""]
    columns = [(m, k) for k in sizes for m in methods]
    rows = []
    for volume in vr.volumes:
        row = [volume]
        for m, k in columns:
            keys = sorted(key for key in vr.entries if key[0] == m and key[1] == k and key[3] == volume)
            if not keys:
                row.append("–")
                continue
            e = vr.entries[keys[0]]
            row.append(f"{_num(e['dice3d']['all']['headline'])} / {_num(e['dice2d']['all'])}")
        rows.append(row)
    lines += _table(["volume", *[f"{METHOD_LABELS.get(m, m)}, {k} annotated" for m, k in columns]], rows) + [""]
    return lines


def _num(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.1f}"


def _fmt_s(stats: tuple[float, float, int]) -> str:
    mean, sd, n = stats
    if n == 0:
        return "–"
    digits = 2 if mean < 10 else 0
    return f"{mean:.{digits}f}" + ("" if math.isnan(sd) else f" ± {sd:.{digits}f}")


def _expected_runs(state: dict, protocol: str) -> set:
    expected = set()
    for inv in state.get("invocations", []):
        sizes = inv["sizes"] if protocol == "slices" else inv["annotated"]
        for m in inv["methods"]:
            for n in sizes:
                for s in inv["seeds"]:
                    if protocol == "slices":
                        expected.add((m, n, s))
                    else:
                        expected.update((m, n, s, v) for v in inv["volumes"])
    return expected


# (method, baseline, what the difference answers): every method against nnU-Net, then the two controls
CONTROL_COMPARISONS = (("nnsam", "nnsam-random", "is the gain from pretrained features?"),
                       ("nnsam-recomputed", "nnsam", "does the embedding cache cost accuracy?"))


def _unit_name(unit: dict) -> str:
    return Unit.from_dict(unit).name


def _test_patients(state: dict) -> dict:
    """item -> patient of the test slices of a labelled-slices report (in-volume items are whole volumes)."""
    split = state.get("split") or {}
    return {_unit_name(u): u["patient"] for u in split.get("test", []) if u.get("patient")}


def _paired_section(results, sizes) -> list[str]:
    """Paired Dice differences on the same items: each method against nnU-Net, and nnSAM against its controls."""
    comparisons = [(m, "nnunet", "") for m in results.methods
                   if m not in ("nnunet", BASELINE) and "nnunet" in results.methods]
    comparisons += [c for c in CONTROL_COMPARISONS if c[0] in results.methods and c[1] in results.methods]
    rows = []
    for method, baseline, question in comparisons:
        for n in sizes:
            p = results.paired(method, baseline, n)
            if p:
                sd = "" if math.isnan(p["sd"]) else f" ± {p['sd']:.2f}"
                rows.append([METHOD_LABELS.get(method, method), METHOD_LABELS.get(baseline, baseline) +
                             (f" ({question})" if question else ""), str(n), f"{p['mean']:+.2f}{sd}", str(p["n"]),
                             f"{p['better']} / {p['worse']}"]
                            + ([f"{p['patients_better']} / {p['patients_worse']} of {p['patients']}"]
                               if results.patients else []))
    if not rows:
        return []
    header = ["Method", "against", "size", "Dice difference (points)", "items", "better / worse"]
    if results.patients:
        header.append("patients better / worse")
    return (["### Paired Dice differences (same seed, same item)", ""] + _table(header, rows)
            + (["", "Patients: the mean difference over each test patient's slices (slices of one patient are not "
                "independent samples)."] if results.patients else []) + [""])


def _seed_section(results, sizes) -> list[str]:
    """Where a method ran with several seeds: each seed's mean Dice and their spread, the yardstick for "within
    seed noise" (e.g. for the embedding cache against recomputing embeddings every step)."""
    rows = []
    for method in results.methods:
        for n in sizes:
            means = results.seed_means(method, n)
            if len(means) < 2:
                continue
            rows.append([METHOD_LABELS.get(method, method), str(n), ", ".join(str(s) for s in means),
                         ", ".join(f"{v:.2f}" for v in means.values()), _fmt(_mean_sd(means.values()))])
    if not rows:
        return []
    return (["### Between seeds (mean Dice of each seed's run, then mean ± SD over seeds)", ""]
            + _table(["Method", "size", "seeds", "Dice per seed (%)", "mean ± SD over seeds"], rows) + [""])


def _sam_branch(runs: Sequence[dict]) -> str:
    """SAM input and injection stage of the runs' SAM branches, e.g. "SAM input `unit-range`, injected at 1/8"."""
    # Runs recorded before metrics.json kept the SAM branch's settings all fed the z-scored slice at 1/8.
    configs = [r.get("nnsam_config") or {} for r in runs if r["method"] not in ("nnunet", BASELINE)]  # no SAM branch
    inputs = sorted({c.get("sam_input", "nnunet") for c in configs})
    strides = sorted({int(c.get("inject_stride", 8)) for c in configs})
    cached = [c for c in configs if c.get("embeddings") != "recomputed"]  # the cache's options mean nothing else
    shares = sorted({float(c.get("recompute_share", 0.0)) for c in cached})
    return (f"SAM input {', '.join(f'`{u}`' for u in inputs) or '-'}, injected at the "
            f"{', '.join(f'1/{s}' for s in strides) or '-'} skip"
            + (f", embeddings recomputed at a share {' or '.join(f'{s:g}' for s in shares)} of the training steps"
               if any(shares) else ""))


def _setup_section(state: dict, runs: Sequence[dict], protocol: str) -> list[str]:
    s = state["settings"]
    iterations = s["iterations"] if s["iterations"] else f"the preset's ({s['preset']})"
    lines = ["## Setup", "",
             f"- Dataset: `{s['dataset']}` ({state['dataset_name']}; classes {', '.join(state['class_names'])}).",
             f"- Encoder `{s['encoder']}` ({_sam_branch(runs)}), preset `{s['preset']}`, "
             f"iterations {iterations}"
             + (f", initial learning rate {s['learning_rate']:g}" if s.get("learning_rate") else "")
             + (f", images downsampled in-plane by {s['downsample']} (block average; labels nearest neighbour) "
                "before training and scoring" if s["downsample"] != 1 else "") + "."]
    if protocol == "slices":
        split = state["split"]
        test = [_unit_name(u) for u in split["test"]]
        pool = [_unit_name(u) for u in split["pool"]]
        patients = sorted({u["patient"] for u in split["test"] if u.get("patient")})
        lines += [f"- Split `{split['mode']}` (fixed seed {split['seed']}, test fraction {split['test_fraction']:.3g}): "
                  f"{len(test)} test slices" + (f" from patients {', '.join(patients)}" if split["mode"] == "patient"
                                                else "") + f": {', '.join(test)}.",
                  f"- Training subsets are nested prefixes of this order of the remaining {len(pool)} slices: "
                  f"{', '.join(pool)}."]
    else:
        ann = state.get("annotated", {})
        positions = state.get("positions", {})
        lines += ["- In-volume protocol: per volume, k evenly spaced labelled slices are the only annotation; the "
                  "model fine-tuned on them segments the volume; the labelled slices not annotated are scored.",
                  "- Volumes and annotated slices: " + "; ".join(
                      f"{v} " + ", ".join(f"k={k}: {sl}" for k, sl in ks.items()) for v, ks in sorted(ann.items()))
                  + "."]
        if positions:
            lines += ["- Sparse volumes: each patient's one-slice cases stacked in slice order (the slice numbers "
                      "above index that stack); their slice indices in the scan, where fill between slices places "
                      "them: " + "; ".join(f"{v} {p}" for v, p in sorted(positions.items())) + "."]
    lines += ["", "Invocations:", ""]
    for inv in state.get("invocations", []):
        lines += [f"- {inv['date']} on {inv['machine']}" + (f" ({inv['note']})" if inv.get("note") else "") + ":",
                  f"  `{inv['command']}`"]
    return lines
