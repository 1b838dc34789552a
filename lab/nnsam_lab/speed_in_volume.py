"""``nnsam-lab bench-speed --scenario in-volume``: the in-volume job at the sizes users have, nnSAM against
nnU-Net, phase by phase.

A volume of N slices of S x S pixels (the cardiac CT set's slices stacked, resized to S; synthetic without it),
K evenly spaced painted slices. Each method fine-tunes on the K slices with the quick preset (``--iterations``
fewer for a shorter run) and then segments all N slices, as ``nnsam train`` + ``nnsam predict`` do; nnSAM runs
with nnsam train's settings unless ``--recompute-share`` / ``--encoder-precision`` say otherwise.

Every second of each method's time to a result falls in exactly one phase:

- ``setup``: reading, planning, preprocessing, building the trainer (nnSAM: also loading the encoder);
- ``bank_fill``: the frozen encoder on the painted slices before training (nnSAM only);
- ``training_encoder``: the frozen encoder inside training steps (the steps the recompute share draws);
- ``training_network``: the rest of the training loop (data loading, augmentation, the U-Net's step, nnU-Net's
  per-epoch bookkeeping);
- ``save``: the end of training and writing the bundle;
- ``segment_encoder``: the frozen encoder at segmentation (one call per slice);
- ``segment_network``: the rest of segmentation (preprocessing, sliding window with mirroring, export).

``--segment-slices M`` segments only the middle M slices and scales the segmentation phases to all N (the job
goes slab by slab with one encoder call per slice, so its time grows linearly with the slices).

Encoder time is measured by timing every call of the frozen encoder; the phases of training are separated by
the times of the first and the last training step.

With ``--iterations`` below the quick preset's, the quick preset is estimated: the first step's network time
(it carries one-off costs) plus the later steps' network time per iteration times the preset's remaining
iterations, plus the encoder time the recompute share draws on average
(share x iterations x batch x the run's measured encoder seconds per slice), which is less noisy than scaling
the few recomputing steps a short run happens to draw.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

PHASES = ("setup", "bank_fill", "training_encoder", "training_network", "save", "segment_encoder",
          "segment_network")
PHASE_LABELS = {
    "setup": "setup (read, plan, preprocess, build)",
    "bank_fill": "bank fill (encoder on the painted slices)",
    "training_encoder": "training: encoder (recomputed steps)",
    "training_network": "training: network, data, bookkeeping",
    "save": "end of training, bundle written",
    "segment_encoder": "segmentation: encoder calls",
    "segment_network": "segmentation: network, pre/post-processing",
}


class EncoderClock:
    """Times every call of every frozen encoder while active (``with clock:``): (start, seconds, slices)."""

    def __init__(self):
        self.calls: list[tuple[float, float, int]] = []
        self.precisions: set[str] = set()

    def __enter__(self):
        from nnsam_core.encoders import FrozenEncoder
        self._original = FrozenEncoder.__call__
        original, calls, precisions = self._original, self.calls, self.precisions

        def timed_call(encoder, slices, *args, **kwargs):
            start = time.perf_counter()
            out = original(encoder, slices, *args, **kwargs)
            calls.append((start, time.perf_counter() - start, int(slices.shape[0])))
            precisions.add(encoder.cpu_precision if encoder.device.type == "cpu" else "bfloat16 (cuda)")
            return out

        FrozenEncoder.__call__ = timed_call
        return self

    def __exit__(self, *exc):
        from nnsam_core.encoders import FrozenEncoder
        FrozenEncoder.__call__ = self._original
        return False

    def between(self, start: float, end: float) -> tuple[float, int]:
        """Encoder seconds and slices of the calls that started in [start, end)."""
        chosen = [(s, n) for t, s, n in self.calls if start <= t < end]
        return sum(s for s, _ in chosen), sum(n for _, n in chosen)


class StepClock:
    """The start of the first and the end of the last training step of every trainer run while active."""

    def __init__(self):
        self.first_start: Optional[float] = None
        self.first_end: Optional[float] = None
        self.last_end: Optional[float] = None
        self.steps = 0

    def __enter__(self):
        from nnsam_core.training.fewshot import nnUNetTrainerFewShot
        self._original = nnUNetTrainerFewShot.train_step
        original = self._original

        def timed_step(trainer, batch):
            start = time.perf_counter()
            if self.first_start is None:
                self.first_start = start
            try:
                return original(trainer, batch)
            finally:
                self.last_end = time.perf_counter()
                if self.first_end is None:
                    self.first_end = self.last_end
                self.steps += 1

        nnUNetTrainerFewShot.train_step = timed_step
        return self

    def __exit__(self, *exc):
        from nnsam_core.training.fewshot import nnUNetTrainerFewShot
        nnUNetTrainerFewShot.train_step = self._original
        return False


@contextlib.contextmanager
def encoder_precision(precision: Optional[str]):
    """Every encoder built inside runs at ``precision`` on a CPU (None: as the engine and the environment say)."""
    from nnsam_core.encoders import PRECISION_ENV
    from nnsam_core.workspace import scoped_environ
    with scoped_environ({PRECISION_ENV: precision}) if precision else contextlib.nullcontext():
        yield


def phases_of_run(t0: float, t_trained: float, t_segmented: float, steps: StepClock, clock: EncoderClock) -> dict:
    """Split one method's run (fine-tune from t0 to t_trained, segmentation to t_segmented) into PHASES."""
    first, last = steps.first_start, steps.last_end
    if first is None or last is None:
        raise RuntimeError("the fine-tune ran no training step")
    bank_s, bank_n = clock.between(t0, first)
    train_enc_s, train_enc_n = clock.between(first, last)
    save_enc_s, _ = clock.between(last, t_trained)
    seg_enc_s, seg_enc_n = clock.between(t_trained, t_segmented)
    first_step_enc_s, _ = clock.between(first, steps.first_end)
    phases = {
        "setup": first - t0 - bank_s,
        "bank_fill": bank_s,
        "training_encoder": train_enc_s,
        "training_network": (last - first) - train_enc_s,
        "save": t_trained - last,  # an encoder call here would be unexpected; it stays in this phase
        "segment_encoder": seg_enc_s,
        "segment_network": (t_segmented - t_trained) - seg_enc_s,
    }
    counts = {"bank_fill_slices": bank_n, "training_encoder_slices": train_enc_n,
              "segment_encoder_slices": seg_enc_n, "save_encoder_s": save_enc_s}
    # The first step carries one-off costs (first allocations, the first batch); the quick estimate keeps it once.
    first_step_network = (steps.first_end - first) - first_step_enc_s
    return {"phases_s": phases, "encoder_calls": counts, "first_step_network_s": first_step_network,
            "fine_tune_s": t_trained - t0,
            "segment_s": t_segmented - t_trained, "total_s": t_segmented - t0}


def scale_segmentation(run: dict, measured_slices: int, volume_slices: int) -> dict:
    """``run`` with its segmentation phases (measured on ``measured_slices`` of the volume) scaled to all
    ``volume_slices``: segmentation goes slab by slab with one encoder call per slice, so it grows linearly."""
    if measured_slices == volume_slices:
        return run
    factor = volume_slices / measured_slices
    phases = dict(run["phases_s"])
    for phase in ("segment_encoder", "segment_network"):
        phases[phase] *= factor
    segment = phases["segment_encoder"] + phases["segment_network"]
    return {**run, "phases_s": phases, "segment_s": segment, "total_s": run["fine_tune_s"] + segment,
            "measured": {"segment_slices": measured_slices, "phases_s": run["phases_s"],
                         "segment_s": run["segment_s"], "total_s": run["total_s"]}}


def quick_estimate(run: dict, iterations: int, quick_iterations: int, share: float, batch_size: int,
                   encoder_s_per_slice: Optional[float]) -> dict:
    """The run's phases with the training loop scaled to ``quick_iterations`` (see the module docstring)."""
    phases = dict(run["phases_s"])
    first = run["first_step_network_s"]
    network_per_iteration = (phases["training_network"] - first) / max(1, iterations - 1)
    if iterations == quick_iterations:  # nothing to estimate
        return {"phases_s": phases, "total_s": sum(phases.values()),
                "training_network_s_per_iteration": network_per_iteration}
    phases["training_network"] = first + network_per_iteration * (quick_iterations - 1)
    if encoder_s_per_slice is not None:
        phases["training_encoder"] = share * quick_iterations * batch_size * encoder_s_per_slice
    else:
        phases["training_encoder"] = phases["training_encoder"] / iterations * quick_iterations
    return {"phases_s": phases, "total_s": sum(phases.values()),
            "training_network_s_per_iteration": network_per_iteration}


def measure_method(method: str, root: Path, image, labels, slices, class_names, device, iterations: Optional[int],
                   seed: int, config=None, precision: Optional[str] = None, encoder: str = "litemedsam",
                   segment_slices: Optional[int] = None) -> dict:
    import SimpleITK as sitk
    from nnsam_core.finetune import fine_tune
    from nnsam_core.predict import Segmenter

    from .speed import _sync

    clock, steps = EncoderClock(), StepClock()
    with encoder_precision(precision), clock, steps:
        t0 = time.perf_counter()
        bundle = fine_tune(image, labels, output=root / f"bundle-{method}", slices=slices, class_names=class_names,
                           encoder=encoder, method=method, preset="quick", iterations=iterations,
                           device=device.type, seed=seed, nnsam_config=config)
        t1 = time.perf_counter()
        n_slices = image.GetSize()[2]
        segmented = segment_slices or n_slices
        z0 = (n_slices - segmented) // 2  # the middle of the volume
        target, truth = (image, labels) if segmented == n_slices else \
            (image[:, :, z0:z0 + segmented], labels[:, :, z0:z0 + segmented])
        segmenter = Segmenter(bundle, device)
        label_map = segmenter.segment(target)
        _sync(device)
        t2 = time.perf_counter()
    if label_map.GetSize() != target.GetSize():
        raise RuntimeError(f"label map size {label_map.GetSize()} differs from the image's {target.GetSize()}")
    run = scale_segmentation(phases_of_run(t0, t1, t2, steps, clock), segmented, n_slices)
    training = bundle.manifest["training"]
    encoder_slices = sum(n for _, _, n in clock.calls)
    run.update({
        "method": method,
        "steps": steps.steps,
        "batch_size": training.get("batch_size"),
        "patch_size": training.get("patch_size"),
        "max_size": training.get("max_size"),
        "recompute_share": float((bundle.manifest.get("nnsam_config") or {}).get("recompute_share", 0.0)),
        "encoder_precision": sorted(clock.precisions),
        "encoder_s_per_slice": sum(s for _, s, _ in clock.calls) / encoder_slices if encoder_slices else None,
        "segmented_slices": segmented,
        "segmenter_encoder_calls": segmenter.encoder_calls,
        "foreground_dice_unpainted": _foreground_dice(sitk.GetArrayViewFromImage(label_map),
                                                      sitk.GetArrayViewFromImage(truth), [z - z0 for z in slices]),
    })
    return run


def _foreground_dice(predicted, truth, painted) -> Optional[float]:
    unseen = [z for z in range(predicted.shape[0]) if z not in painted]
    if not unseen:
        return None
    p, g = predicted[unseen] > 0, truth[unseen] > 0
    denominator = int(p.sum() + g.sum())
    return 2.0 * int((p & g).sum()) / denominator if denominator else None


def run_in_volume(args) -> int:
    from nnsam_core.devices import resolve_device
    from nnsam_core.encoders import resolve_cpu_precision
    from nnsam_core.errors import NNSAMError
    from nnsam_core.finetune import PRESETS
    from nnsam_core.methods import check_recompute_share
    from nnsam_core.training.nnsam import nnUNetTrainerNNSAM
    from nnsam_core.training.registry import config_of_trainer

    from .speed import (SliceSource, _machine, annotated_indices, find_chd_dataset, on_encoder,
                        write_result_json)

    device = resolve_device(args.device)
    if args.size < 32:
        raise NNSAMError("--size must be at least 32")
    if args.slices < 2:
        raise NNSAMError("--slices must be at least 2 for the in-volume scenario")
    if not 1 <= args.annotated < args.slices:
        raise NNSAMError(f"--annotated must be at least 1 and fewer than --slices ({args.slices})")
    if args.segment_slices is not None and not 1 <= args.segment_slices <= args.slices:
        raise NNSAMError(f"--segment-slices must be 1 to --slices ({args.slices})")
    if args.iterations is not None and args.iterations < 2:
        raise NNSAMError("--iterations must be at least 2 (the time per iteration needs two steps)")
    check_recompute_share(args.recompute_share)
    precision = args.encoder_precision
    resolved = resolve_cpu_precision(precision)  # a bad value fails now, in one line
    if args.encoder == "mobilesam" and not args.random_encoder:
        from nnsam_core.weights import require_mobilesam
        require_mobilesam()
    if args.work_dir:
        try:
            Path(args.work_dir).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise NNSAMError(f"cannot create --work-dir {args.work_dir} ({exc.strerror}); give a writable folder")

    data_dir = None if args.synthetic else find_chd_dataset(args.data)
    source = SliceSource(args.size, data_dir)
    image, labels = source.volume(args.slices)
    painted = annotated_indices(args.slices, args.annotated)
    quick = PRESETS["quick"]
    iterations = args.iterations or quick
    default = config_of_trainer(nnUNetTrainerNNSAM)
    config = on_encoder(dataclasses.replace(default, recompute_share=args.recompute_share), args.encoder,
                        args.random_encoder)
    config = None if config == default else config
    share = (config or default).partial_recompute_share
    started = datetime.datetime.now(datetime.timezone.utc)
    machine = _machine(device)
    root = Path(tempfile.mkdtemp(prefix="nnsam-bench-in-volume-", dir=args.work_dir))
    result = {"command": "nnsam-lab " + " ".join(sys.argv[1:]), "scenario": "in-volume",
              "date_utc": started.isoformat(timespec="seconds"), "device": device.type, "machine": machine,
              "data": source.description, "volume": list(image.GetSize()), "annotated_slices": painted,
              "iterations": iterations, "quick_preset_iterations": quick, "recompute_share": share,
              "encoder": {"name": args.encoder, "weights": "random" if args.random_encoder else "pretrained",
                          "precision_requested": precision or os.environ.get("NNSAM_ENCODER_PRECISION") or "auto",
                          "precision_resolved": resolved if device.type == "cpu" else "bfloat16 (cuda)"},
              "methods": {}}

    def say(message: str) -> None:
        print(f"[bench-speed in-volume {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    try:
        for method in ("nnunet", "nnsam"):
            say(f"{method}: fine-tune on {len(painted)} of {args.slices} slices ({iterations} iterations), "
                "then segment every slice")
            run = measure_method(method, root, image, labels, painted, source.class_names, device, args.iterations,
                                 args.seed, config=config if method == "nnsam" else None, precision=precision,
                                 encoder=args.encoder, segment_slices=args.segment_slices)
            run["quick"] = quick_estimate(run, iterations, quick, share if method == "nnsam" else 0.0,
                                          run["batch_size"] or 1, run["encoder_s_per_slice"])
            result["methods"][method] = run
            say(f"{method}: {run['total_s']:.1f} s to a result ({run['fine_tune_s']:.1f} s fine-tune, "
                f"{run['segment_s']:.1f} s segmentation)")
        sam, unet = result["methods"]["nnsam"], result["methods"]["nnunet"]
        result["ratio_measured"] = sam["total_s"] / unet["total_s"]
        result["ratio_quick"] = sam["quick"]["total_s"] / unet["quick"]["total_s"]
        cache_only = dict(sam["quick"]["phases_s"], training_encoder=0.0)
        result["nnsam_quick_cache_only_s"] = sum(cache_only.values())
        result["ratio_quick_cache_only"] = result["nnsam_quick_cache_only_s"] / unet["quick"]["total_s"]
        result["wall_s"] = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
    finally:
        if not args.keep_work_dir:
            shutil.rmtree(root, ignore_errors=True)
    write_result_json(args.json, result)
    print(f"nnsam-lab bench-speed --scenario in-volume, {result['date_utc']}, device {device.type} "
          f"({machine.get('gpu') or machine.get('cpu', '')}, {machine['cpu_count']} cores, {machine['torch_threads']} "
          f"torch threads, load {', '.join(f'{x:.2f}' for x in machine.get('load_average_at_start') or [])}), "
          f"data: {source.description}")
    print(format_in_volume_table(result))
    print(f"time_to_result_ratio={result['ratio_quick']:.4f}", flush=True)
    return 0


def _s(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def format_in_volume_table(r: dict) -> str:
    sam, unet = r["methods"]["nnsam"], r["methods"]["nnunet"]
    size = "x".join(map(str, r["volume"]))
    measured_head = f"measured, {r['iterations']} it (s)"
    quick = r["iterations"] != r["quick_preset_iterations"]
    quick_head = f"quick preset {r['quick_preset_iterations']} it, estimated (s)" if quick else None
    head = ["phase", f"nnU-Net {measured_head}", f"nnSAM {measured_head}"]
    if quick:
        head += [f"nnU-Net {quick_head}", f"nnSAM {quick_head}"]
    rows = [head]
    for phase in PHASES:
        row = [PHASE_LABELS[phase], _s(unet["phases_s"][phase]), _s(sam["phases_s"][phase])]
        if quick:
            row += [_s(unet["quick"]["phases_s"][phase]), _s(sam["quick"]["phases_s"][phase])]
        rows.append(row)
    total = ["time to a result", _s(unet["total_s"]), _s(sam["total_s"])]
    ratio = ["ratio nnSAM / nnU-Net", "", f"{r['ratio_measured']:.2f}"]
    if quick:
        total += [_s(unet["quick"]["total_s"]), _s(sam["quick"]["total_s"])]
        ratio += ["", f"{r['ratio_quick']:.2f}"]
    rows += [total, ratio]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [f"volume {size} ({len(r['annotated_slices'])} painted: {r['annotated_slices']}), training patch "
             f"{'x'.join(map(str, sam['patch_size'] or []))} at batch {sam['batch_size']} "
             f"(max size {sam['max_size'] or 'native'}), nnSAM: recompute share {r['recompute_share']:g}, encoder "
             f"{r['encoder']['name']} at {', '.join(sam['encoder_precision']) or r['encoder']['precision_resolved']} "
             f"({_s3(sam['encoder_s_per_slice'])} s per slice)"]
    for k, row in enumerate(rows):
        lines.append("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |")
        if k == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    calls = sam["encoder_calls"]
    segmented = sam.get("segmented_slices", r["volume"][2])
    lines.append(f"encoder slices: bank fill {calls['bank_fill_slices']}, training {calls['training_encoder_slices']} "
                 f"({sam['steps']} steps), segmentation {calls['segment_encoder_slices']} "
                 f"({sam['segmenter_encoder_calls'] / segmented:.2f} per slice)")
    if segmented != r["volume"][2]:
        lines.append(f"segmentation measured on the middle {segmented} of the {r['volume'][2]} slices and scaled "
                     f"to all of them (time to a result with the measured slices only: nnU-Net "
                     f"{_s(unet['measured']['total_s'])} s, nnSAM {_s(sam['measured']['total_s'])} s)")
    lines.append(f"nnSAM with the cache alone (recompute share 0; estimate, time side only): "
                 f"{_s(r['nnsam_quick_cache_only_s'])} s, ratio {r['ratio_quick_cache_only']:.2f}")
    dice = [m.get("foreground_dice_unpainted") for m in (unet, sam)]
    lines.append("foreground Dice on unpainted slices, nnU-Net / nnSAM (a sanity check of this run, not an accuracy "
                 f"measurement): {' / '.join('n/a' if d is None else f'{d:.3f}' for d in dice)}")
    return "\n".join(lines)


def _s3(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3f}"
