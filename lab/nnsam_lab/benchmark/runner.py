"""Run the benchmark: train each (method, size, seed), segment the test slices, score, and keep everything.

Layout of REPORT_DIR::

    benchmark.json                 settings, split (or volumes), one entry per invocation (command, date, machine)
    data/                          the benchmark's slices (or volumes) as NIfTI, after optional downsampling
    runs/<method>/n04_seed0/       one run of the labelled-slices protocol
        metrics.json               written last: its presence means "finished" (a rerun skips the run)
        predictions/<unit>.nii.gz  the test predictions (the figure is drawn from them)
    runs/<method>/k2_seed0/<volume>/   one run of the in-volume protocol (metrics.json, prediction.nii.gz)
    report.md, results.csv, dice_vs_size.png, examples.png   rewritten after every finished run

Fairness: every method of one (size, seed) trains on the same slices with the same seed, preset, iteration count
and device; test slices are never trained on and nothing is tuned on them (there is nothing to tune: the preset
fixes the schedule).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import SimpleITK as sitk

from nnsam_core.errors import NNSAMError
from nnsam_core.methods import DEFAULT_RECOMPUTE_SHARE, LEGACY_RECOMPUTE_SHARE
from .adapt import BASE_MODEL, START_FROM_METHODS, check_start_from, keeps_model, parent_of
from .data import DatasetInfo, UnitStore, pick_volumes, read_dataset, with_sparse_volumes
from .fill import BENCH_METHODS, FILL_BETWEEN, fill_between, load_itk
from .splits import Unit, default_split_mode, evenly_spaced, make_split

PROTOCOLS = ("slices", "in-volume")
FORMAT_VERSION = 1
Log = Callable[[str], None]


def make_logger(stream=None) -> Log:
    """Timestamped lines to the stream given now: fine_tune sends stdout to stderr while it trains, and the
    benchmark's own progress should stay on the real stdout."""
    stream = stream or sys.stdout

    def log(message: str) -> None:
        stream.write(f"[{datetime.datetime.now().strftime('%H:%M:%S')}] {message}\n")
        stream.flush()

    return log


@dataclass
class Settings:
    """What every run of one report shares; a report folder refuses runs made with other settings."""

    protocol: str
    dataset: str
    encoder: str = "litemedsam"
    preset: str = "quick"
    iterations: Optional[int] = None
    learning_rate: Optional[float] = None  # initial learning rate of every trained run; None: fine_tune's default
    downsample: int = 1
    split: Optional[str] = None           # slices protocol: patient | slice
    test_fraction: Optional[float] = None
    device: str = "auto"                  # recorded, not compared: results from another device can be mixed
    sam_input: Optional[str] = None       # SAM input preparation of the nnsam methods; None: the encoder's default
    inject_stride: Optional[int] = None   # skip the nnsam methods inject at; None: the trainer's (1/8, the authors')
    recompute_share: Optional[float] = None  # share of training steps recomputing; None: the trainer's (Plan fixes it)

    # Settings that change only the SAM branch; left unset they are not compared, so report folders written
    # before a setting existed still accept runs.
    SAM_BRANCH_FIELDS = ("sam_input", "inject_stride", "recompute_share")
    UNSET_NOT_COMPARED = SAM_BRANCH_FIELDS + ("learning_rate",)

    def comparable(self) -> dict:
        data = asdict(self)
        data.pop("device")
        for name in self.UNSET_NOT_COMPARED:
            if data[name] is None:
                data.pop(name)
        return data

    def nnsam_config(self, method: str):
        """The SAM branch of ``method`` under these settings (None: the method's own trainer as it is)."""
        chosen = {name: getattr(self, name) for name in self.SAM_BRANCH_FIELDS if getattr(self, name) is not None}
        if method in ("nnunet", FILL_BETWEEN) or not chosen:
            return None
        from nnsam_core.training.registry import config_of_trainer, trainer_for
        base = config_of_trainer(trainer_for(method, self.encoder))
        if base.embeddings == "recomputed":
            chosen.pop("recompute_share", None)  # it recomputes at every step; a share means nothing there
        return replace(base, **chosen) if chosen else None


@dataclass
class Plan:
    settings: Settings
    methods: list[str]
    sizes: list[int] = field(default_factory=list)        # slices protocol
    annotated: list[int] = field(default_factory=list)    # in-volume protocol: k per volume
    seeds: list[int] = field(default_factory=lambda: [0])
    volumes: list[str] = field(default_factory=list)
    report_classes: Optional[list[str]] = None            # classes of the headline mean (default: all)
    keep_models: bool = False
    note: str = ""
    start_from: Optional[str] = None                      # the saved model of the start-from methods (adapt.py)

    def __post_init__(self):
        # The share the nnsam methods train with is recorded even when it is the default, so a report folder
        # never mixes runs trained before and after the default changed (see init_state).
        if self.settings.recompute_share is None:
            self.settings = replace(self.settings, recompute_share=DEFAULT_RECOMPUTE_SHARE)


def machine_description(device: str) -> str:
    import torch

    cores = os.cpu_count() or 1
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cores}-core CPU ({platform.processor() or platform.machine()}), {gpu}, device {device}; "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}, torch {torch.__version__}")


# --------------------------------------------------------------------------------------------- the state file
def load_state(report_dir: Path) -> Optional[dict]:
    path = report_dir / "benchmark.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")  # unique: processes may share a report folder
    tmp.write_text(json.dumps(data, indent=2, allow_nan=True))
    tmp.replace(path)  # atomic: a killed run never leaves a truncated marker


@contextlib.contextmanager
def _state_lock(report_dir: Path):
    """Serialise read-modify-write of benchmark.json between processes sharing a report folder."""
    import fcntl

    report_dir.mkdir(parents=True, exist_ok=True)
    with open(report_dir / ".benchmark.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def init_state(report_dir: Path, plan: Plan, extra: dict, command: Optional[str],
               amend: Optional[Callable[[dict], None]] = None) -> dict:
    """Create benchmark.json or check that the existing one was made with the same settings and split, and
    record this invocation (``amend`` may add to the state under the same lock)."""
    with _state_lock(report_dir):
        return _init_state_locked(report_dir, plan, extra, command, amend)


def _settings_as_held(held: dict, now: dict, methods: Sequence[str]) -> dict:
    """A folder's recorded settings as today's record would give them: a folder that recorded no share trained its
    nnsam runs at the then default, the cache alone; runs of nnunet alone do not depend on it."""
    if "recompute_share" in held or "recompute_share" not in now:
        return held
    nnunet_only = all(m == "nnunet" for m in methods)
    return {"recompute_share": now["recompute_share"] if nnunet_only else LEGACY_RECOMPUTE_SHARE, **held}


def _continue_hint(held: dict, now: dict) -> str:
    """How to add runs to a folder trained at another share than today's."""
    if "recompute_share" not in held or held["recompute_share"] == now.get("recompute_share"):
        return ""
    return f" (or --recompute-share {held['recompute_share']:g} to continue it)"


def _init_state_locked(report_dir: Path, plan: Plan, extra: dict, command: Optional[str],
                       amend: Optional[Callable[[dict], None]]) -> dict:
    state = load_state(report_dir)
    fresh = {"format_version": FORMAT_VERSION, "settings": plan.settings.comparable(), **extra}
    if state is None:
        state = {**fresh, "invocations": []}
    else:
        for key, value in fresh.items():
            held = state.get(key)
            hint = ""
            if key == "settings" and isinstance(held, dict):
                held = _settings_as_held(held, value, plan.methods)
                hint = _continue_hint(held, value)
            if json.loads(json.dumps(held)) != json.loads(json.dumps(value)):
                raise NNSAMError(f"{report_dir} holds a benchmark made with other {key} "
                                 f"({_short(held)} vs now {_short(value)}); use another -o REPORT_DIR{hint}")
    state["invocations"].append({
        "command": command or shlex.join(["nnsam-lab", *sys.argv[1:]]),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine_description(plan.settings.device),
        "methods": plan.methods, "sizes": plan.sizes, "annotated": plan.annotated, "seeds": plan.seeds,
        "volumes": plan.volumes, "device": plan.settings.device, "note": plan.note,
        "report_classes": plan.report_classes,
        **({"start_from": plan.start_from} if plan.start_from else {}),
    })
    if amend is not None:
        amend(state)
    _write_json(report_dir / "benchmark.json", state)
    return state


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) < 80 else text[:77] + "..."


# --------------------------------------------------------------------------------------------- training hooks
def _fine_tune(**kwargs):
    # Looked up at call time so tests can monkeypatch nnsam_core.finetune.fine_tune.
    from nnsam_core import finetune
    return finetune.fine_tune(**kwargs)


def _load_or_train(model_dir: Path, log: Log, **kwargs):
    """Reuse a model left by a run that died after training (before its metrics were written); else train."""
    from nnsam_core.bundle import Bundle

    if (model_dir / "nnsam.json").is_file():
        try:
            bundle = Bundle.load(model_dir)
            log(f"  reusing the trained model in {model_dir}")
            return bundle
        except NNSAMError:
            shutil.rmtree(model_dir, ignore_errors=True)
    # resume=True: a run killed mid-training continues from its last epoch checkpoint (kept in fine_tune's work
    # folder beside the model); without a checkpoint fine_tune starts from scratch.
    return _fine_tune(output=model_dir, resume=True, **kwargs)


def _train_progress(log: Log) -> Callable[[dict], None]:
    """fine_tune's events, thinned for a log file: stage changes and every 10 % of training."""
    last = {"stage": None, "decile": -1}

    def callback(event: dict) -> None:
        stage = event.get("stage")
        if stage == "train" and event.get("total"):
            decile = int(10 * event["step"] / event["total"])
            if decile != last["decile"]:
                last["decile"] = decile
                eta = event.get("eta_s")
                log(f"  train {event['step']}/{event['total']} loss {event.get('loss')}"
                    + (f" eta {eta:.0f}s" if eta is not None else ""))
        elif stage != last["stage"] and stage not in ("predict",):
            log(f"  {stage}: {event.get('message', '')}")
        last["stage"] = stage

    return callback


def _score(pred: sitk.Image, gt: sitk.Image, values: Sequence[int], exclude: Sequence[int] = ()) -> list[dict]:
    """Per-slice 2D scores of every labelled slice (minus ``exclude``), with the in-plane spacing in mm."""
    from nnsam_core.evaluation import evaluate_case

    pred_array = sitk.GetArrayFromImage(pred)
    gt_array = sitk.GetArrayFromImage(gt)
    if pred_array.ndim == 2:
        pred_array, gt_array = pred_array[None], gt_array[None]
    spacing = tuple(reversed(gt.GetSpacing()))
    if len(spacing) == 2:
        spacing = (1.0, *spacing)
    result = evaluate_case(pred_array, gt_array, spacing, values, "2d", exclude_slices=list(exclude) or None)
    return [{"k": s["slice"], "classes": {str(v): c for v, c in s["classes"].items()}} for s in result["scores"]]


def _claim(run_dir: Path):
    """An exclusive lock on one run, so several benchmark processes can share a report folder (one per core or
    GPU): a run being trained elsewhere is skipped, not trained twice. None if another process holds it."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / ".run.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    if (run_dir / "metrics.json").is_file():  # finished by the other process while we waited for the lock
        handle.close()
        return None
    return handle


def _run_record(bundle, started: float, trained: float) -> dict:
    """Timing and training facts every run's metrics.json records."""
    training = bundle.manifest["training"]
    return {"train_seconds": round(trained - started, 1), "predict_seconds": round(time.monotonic() - trained, 1),
            "iterations": training["iterations"], "batch_size": training["batch_size"], "device": training["device"],
            "nnsam_config": bundle.manifest.get("nnsam_config"),
            **({"start_from": training["start_from"]} if training.get("start_from") else {}),
            "finished": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def _finish_run(run_dir: Path, metrics: dict, keep_models: bool) -> None:
    _write_json(run_dir / "metrics.json", metrics)
    shutil.rmtree(run_dir / "train_raw", ignore_errors=True)
    if not keep_models:
        shutil.rmtree(run_dir / "model", ignore_errors=True)  # ~100-200 MB each; predictions are kept


# --------------------------------------------------------------------------------------------- protocols
def run_slices_benchmark(dataset_dir, report_dir, plan: Plan, log: Optional[Log] = None,
                         command: Optional[str] = None, dry_run: bool = False) -> dict:
    """Labelled-slices protocol (the paper's Table 1): fixed test slices, nested training subsets."""
    report_dir = Path(report_dir)
    log = log or make_logger()
    _check_methods(plan)
    info = read_dataset(dataset_dir)
    units = info.units()
    settings = plan.settings
    settings.split = settings.split or default_split_mode(units)
    split = make_split(units, settings.split, settings.test_fraction, max(plan.sizes))
    _check_classes(plan, info)
    log(f"{info.folder.name}: {len(units)} labelled slices; {settings.split} split: {len(split.test)} test "
        f"(patients {', '.join(split.test_patients()) or 'n/a'}), {len(split.pool)} training candidates")
    runs = [(seed, size, method) for seed in plan.seeds for size in plan.sizes for method in plan.methods]
    if dry_run:
        for size in plan.sizes:
            log(f"  {size} training slices: {', '.join(u.name for u in split.training_subset(size))}")
        log(f"  test: {', '.join(u.name for u in split.test)}")
        log(f"  {len(runs)} runs: " + "; ".join(f"{m} n={n} seed={s}" for s, n, m in runs))
        return {"split": split, "runs": runs}
    report_dir.mkdir(parents=True, exist_ok=True)
    state = init_state(report_dir, plan, {"dataset_name": info.folder.name, "class_names": info.class_names,
                                          "split": split.as_dict()}, command)
    store = UnitStore(info, report_dir / "data", settings.downsample)
    for unit in sorted(set(split.test) | set(split.training_subset(max(plan.sizes)))):
        store.prepare_unit(unit)
    values = list(range(1, len(info.class_names) + 1))

    from .report import write_report
    done, reported = 0, time.monotonic() - 3600
    for i, (seed, size, method) in enumerate(runs, start=1):
        run_dir = report_dir / "runs" / method / f"n{size:02d}_seed{seed}"
        if (run_dir / "metrics.json").is_file():
            log(f"[{i}/{len(runs)}] {method} n={size} seed={seed}: finished earlier, skipped")
            continue
        lock = _claim(run_dir)
        if lock is None:
            log(f"[{i}/{len(runs)}] {method} n={size} seed={seed}: another benchmark process is running it, skipped")
            continue
        log(f"[{i}/{len(runs)}] {method} n={size} seed={seed}: training")
        train_units = split.training_subset(size)
        started = time.monotonic()
        raw = store.write_training_dataset(run_dir / "train_raw", train_units)
        bundle = _load_or_train(run_dir / "model", log, dataset_dir=raw, method=method, encoder=settings.encoder,
                                preset=settings.preset, iterations=settings.iterations,
                                learning_rate=settings.learning_rate, device=settings.device,
                                seed=seed, nnsam_config=settings.nnsam_config(method), progress=_train_progress(log))
        trained = time.monotonic()
        scores = _predict_units(bundle, store, split.test, run_dir / "predictions", values, settings.device, log)
        metrics = {"protocol": "slices", "method": method, "size": size, "seed": seed,
                   "train_units": [u.name for u in train_units], "test_units": [u.name for u in split.test],
                   **_run_record(bundle, started, trained), "scores": scores}
        _finish_run(run_dir, metrics, plan.keep_models)
        lock.close()
        done += 1
        log(f"  done in {metrics['train_seconds'] + metrics['predict_seconds']:.0f}s "
            f"(train {metrics['train_seconds']:.0f}s, predict {metrics['predict_seconds']:.0f}s)")
        reported = _interim_report(report_dir, plan, reported)
    paths = write_report(report_dir, plan.report_classes)
    log(f"report: {paths['report']}")
    return {"split": split, "runs": runs, "trained": done, "report": paths, "state": state}


def _predict_units(bundle, store: UnitStore, units: Sequence[Unit], out_dir: Path, values, device: str,
                   log: Log) -> list[dict]:
    from nnsam_core.predict import Segmenter, write_image_atomically

    segmenter = Segmenter(bundle, device)
    scores = []
    for unit in units:
        image, gt = store.read(unit.name)
        pred = segmenter.segment(image)
        write_image_atomically(sitk.Cast(pred, sitk.sitkUInt8), out_dir / f"{unit.name}.nii.gz")
        for score in _score(pred, gt, values):
            scores.append({"item": unit.name, "unit": unit.name, "case": unit.case, "k": unit.k,
                           "classes": score["classes"]})
    log(f"  segmented {len(units)} test slices")
    return scores


def run_in_volume_benchmark(dataset_dir, report_dir, plan: Plan, count: Optional[int] = None,
                            log: Optional[Log] = None, command: Optional[str] = None, dry_run: bool = False) -> dict:
    """The clinician's workflow: per volume, annotate k evenly spaced labelled slices, fine-tune on them alone,
    segment the volume and score the labelled slices that were not annotated."""
    report_dir = Path(report_dir)
    log = log or make_logger()
    _check_methods(plan)
    info = read_dataset(dataset_dir)
    _check_classes(plan, info)
    sparse = not info.volumes
    if sparse:
        # One-slice cases <patient>_<slice index>: each patient's labelled slices are that patient's sparse volume.
        info = with_sparse_volumes(info)
    volumes = pick_volumes(info, count, plan.volumes or None, min_labelled=max(plan.annotated) + 1)
    plan.volumes = volumes
    annotated = {v: {str(k): evenly_spaced(info.volumes[v], k) for k in plan.annotated} for v in volumes}
    positions = {v: info.positions[v] for v in volumes if v in info.positions}
    runs = [(seed, k, method, v) for seed in plan.seeds for k in plan.annotated for method in plan.methods
            for v in volumes]
    log(f"{info.folder.name}: in-volume protocol on {len(volumes)} " + ("sparse volumes (one patient's one-slice "
        "cases each)" if sparse else "volumes") + f" ({', '.join(volumes)}), k = {plan.annotated}; {len(runs)} runs")
    if dry_run:
        for v in volumes:
            where = f" at slice indices {positions[v]}" if v in positions else ""
            log(f"  {v}: labelled {info.volumes[v]}{where}; annotated " +
                "; ".join(f"k={k}: {annotated[v][str(k)]}" for k in plan.annotated))
        return {"volumes": volumes, "annotated": annotated, "positions": positions, "runs": runs}
    report_dir.mkdir(parents=True, exist_ok=True)

    def amend(state: dict) -> None:
        state.setdefault("annotated", {}).update(annotated)
        if positions:
            state.setdefault("positions", {}).update(positions)

    # Volumes and their annotated slices are not compared across invocations: adding volumes later is fine, and
    # each run records its own annotated slices.
    state = init_state(report_dir, plan, {"dataset_name": info.folder.name, "class_names": info.class_names},
                       command, amend=amend)
    store = UnitStore(info, report_dir / "data", plan.settings.downsample)
    for v in volumes:
        store.prepare_volume(v)
    values = list(range(1, len(info.class_names) + 1))

    from nnsam_core.predict import Segmenter, write_image_atomically
    from .report import write_report
    settings = plan.settings
    saved_model = None
    if BASE_MODEL in plan.methods:
        from nnsam_core.adapt import load_parent
        saved_model = load_parent(plan.start_from)  # loaded once: it segments every volume as it is
    done, reported = 0, 0.0
    for i, (seed, k, method, volume) in enumerate(runs, start=1):
        run_dir = report_dir / "runs" / method / f"k{k}_seed{seed}" / volume
        if (run_dir / "metrics.json").is_file():
            log(f"[{i}/{len(runs)}] {method} k={k} seed={seed} {volume}: finished earlier, skipped")
            continue
        lock = _claim(run_dir)
        if lock is None:
            log(f"[{i}/{len(runs)}] {method} k={k} seed={seed} {volume}: another benchmark process is running it, "
                "skipped")
            continue
        slices = annotated[volume][str(k)]
        image, gt = store.read(volume)
        if method == FILL_BETWEEN:
            load_itk()
        started = time.monotonic()
        if method == FILL_BETWEEN:
            log(f"[{i}/{len(runs)}] {method} k={k} seed={seed} {volume}: filling between slices {slices}")
            pred = _fill_between_image(gt, slices, positions.get(volume))
            record = _fill_record(started)
        elif method == BASE_MODEL:
            log(f"[{i}/{len(runs)}] {method} k={k} seed={seed} {volume}: segmenting with {plan.start_from}")
            pred = Segmenter(saved_model.bundle, settings.device).segment(image)
            # Nothing trains: its time is segmentation alone, and it learned nothing from this volume.
            record = {**_run_record(saved_model.bundle, started, started), "iterations": 0,
                      "start_from": saved_model.record()}
        else:
            if method in START_FROM_METHODS:
                # adapting keeps the saved model's method, encoder, plans and SAM settings (nnsam train --start-from)
                parent = parent_of(method, Path(plan.start_from), run_dir.parent, volumes, volume)
                log(f"[{i}/{len(runs)}] {method} k={k} seed={seed} {volume}: adapting {parent} to slices {slices}")
                training = {"start_from": parent}
            else:
                log(f"[{i}/{len(runs)}] {method} k={k} seed={seed} {volume}: training on slices {slices}")
                training = {"modality": info.channel_name, "method": method, "encoder": settings.encoder,
                            "preset": settings.preset, "nnsam_config": settings.nnsam_config(method)}
            bundle = _load_or_train(run_dir / "model", log, image=image, labels=gt, slices=slices,
                                    class_names=info.class_names, iterations=settings.iterations,
                                    learning_rate=settings.learning_rate, device=settings.device, seed=seed,
                                    progress=_train_progress(log), **training)
            trained = time.monotonic()
            pred = Segmenter(bundle, settings.device).segment(image)
            record = _run_record(bundle, started, trained)
        write_image_atomically(sitk.Cast(pred, sitk.sitkUInt8), run_dir / "prediction.nii.gz")
        scores = [{"item": volume, "unit": f"{volume}_z{s['k']:03d}", "case": volume, "k": s["k"],
                   "classes": s["classes"]} for s in _score(pred, gt, values, exclude=slices)]
        metrics = {"protocol": "in-volume", "method": method, "size": k, "seed": seed, "volume": volume,
                   "train_units": [f"{volume}_z{s:03d}" for s in slices], "annotated_slices": slices,
                   "scored_slices": [s["k"] for s in scores],
                   **({"slice_positions": positions[volume]} if volume in positions else {}),
                   **record, "scores": scores}
        _finish_run(run_dir, metrics, plan.keep_models or keeps_model(method))
        lock.close()
        done += 1
        log(f"  done: {len(scores)} slices scored (train {metrics['train_seconds']:.0f}s, "
            f"predict {metrics['predict_seconds']:.0f}s)")
        reported = _interim_report(report_dir, plan, reported)
    paths = write_report(report_dir, plan.report_classes)
    log(f"report: {paths['report']}")
    return {"volumes": volumes, "annotated": annotated, "runs": runs, "trained": done, "report": paths,
            "state": state}


def _fill_between_image(gt: sitk.Image, painted: Sequence[int], positions: Optional[Sequence[int]]) -> sitk.Image:
    """Fill between the painted slices of ``gt`` (the clinician's baseline), on ``gt``'s grid."""
    filled = fill_between(sitk.GetArrayFromImage(gt), painted, positions)
    pred = sitk.GetImageFromArray(filled)
    pred.CopyInformation(gt)
    return pred


def _fill_record(started: float) -> dict:
    """A fill-between run's metrics.json facts, in the networks' fields: nothing trains, so all its time is
    segmentation."""
    return {"train_seconds": 0.0, "predict_seconds": round(time.monotonic() - started, 3), "iterations": None,
            "batch_size": None, "device": "cpu", "nnsam_config": None,
            "finished": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def _interim_report(report_dir: Path, plan: Plan, last: float, every_s: float = 120.0) -> float:
    """Rewrite the report while a long benchmark runs (partial results readable), at most every ``every_s``."""
    from .report import write_report

    now = time.monotonic()
    if now - last < every_s:
        return last
    write_report(report_dir, plan.report_classes)
    return now


def _check_methods(plan: Plan) -> None:
    for method in plan.methods:
        if method not in BENCH_METHODS + START_FROM_METHODS:
            raise NNSAMError(f"unknown method '{method}'; choose from {', '.join(BENCH_METHODS + START_FROM_METHODS)}")
    check_start_from(plan.methods, plan.start_from, plan.settings.protocol)
    if plan.settings.protocol != "in-volume" and FILL_BETWEEN in plan.methods:
        raise NNSAMError("fill-between interpolates between the annotated slices of one volume, so it runs in the "
                         "in-volume protocol only; add --in-volume or drop it from --methods")


def _check_classes(plan: Plan, info: DatasetInfo) -> None:
    if plan.report_classes:
        unknown = [c for c in plan.report_classes if c not in info.class_names]
        if unknown:
            raise NNSAMError(f"--classes {unknown} are not classes of {info.folder.name} "
                             f"({', '.join(info.class_names)})")
