"""``nnsam-lab bench-encoder``: the frozen encoder alone, per precision and batch size: seconds per slice, and how
far each precision's embeddings are from float32's on real slices.

The slices are the cardiac CT set's (``../shared/data/Dataset901_CHD``), each clipped to its own 0.5-99.5
percentiles and z-scored (what nnU-Net's CT normalisation does with the dataset's percentiles), then prepared as
the encoder's default input preparation says; ``--synthetic`` uses the speed benchmark's synthetic slices.

Error against float32, per slice: relative L2 (``||e - e32|| / ||e32||``) and cosine similarity of the whole
embedding, both also after what the network actually sees: the bank's float16 storage and the per-channel
standardisation with the slices' own statistics (``embedding_norm='standardise'``). float32 itself stored in
float16 is the reference row for the storage's own error; float32 on the slices plus mild Gaussian noise (a
strength nnU-Net's training augmentation uses) is a yardstick for what the network is trained to tolerate.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from nnsam_core.methods import ENCODER_NAMES

NOISE_ROW = "float32+noise"


def parse_list(text: str, what: str, cast=str, allowed: Optional[Sequence] = None) -> list:
    from nnsam_core.errors import NNSAMError
    items = [x.strip() for x in str(text).split(",") if x.strip()]
    try:
        values = [cast(x) for x in items]
    except ValueError:
        raise NNSAMError(f"{what} wants a comma-separated list, not {text!r}") from None
    if not values:
        raise NNSAMError(f"{what} is empty")
    if allowed is not None and any(v not in allowed for v in values):
        raise NNSAMError(f"{what}: each value must be one of {', '.join(map(str, allowed))}, not {text!r}")
    if cast is int and any(v < 1 for v in values):
        raise NNSAMError(f"{what} wants positive numbers, not {text!r}")
    return values


def normalised_slices(n: int, data_dir: Optional[Path], size: int = 512) -> tuple[list[np.ndarray], str]:
    from .speed import SliceSource
    source = SliceSource(size, data_dir)
    out = []
    for i in range(n):
        image = source.slice(i)[0].astype(np.float32)
        low, high = np.percentile(image, [0.5, 99.5])
        image = np.clip(image, low, high)
        out.append((image - image.mean()) / max(float(image.std()), 1e-6))
    return out, source.description


def embedding_errors(reference, other) -> dict:
    """Per-slice relative L2 and cosine of ``other`` against ``reference`` ((N, C, h, w) float tensors)."""
    import torch
    a = reference.flatten(1).double()
    b = other.flatten(1).double()
    rel = ((b - a).norm(dim=1) / a.norm(dim=1).clamp_min(1e-12)).tolist()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1).tolist()
    return {"relative_l2_mean": statistics.fmean(rel), "relative_l2_max": max(rel),
            "cosine_mean": statistics.fmean(cos), "cosine_min": min(cos)}


def standardised(embeddings, mean, std):
    return (embeddings - mean[None, :, None, None]) / std[None, :, None, None]


def run_bench_encoder(args) -> int:
    import torch
    from nnsam_core.encoders import ENCODER_PRECISIONS, load_encoder, native_cpu_bfloat16, resolve_cpu_precision
    from nnsam_core.errors import NNSAMError
    from nnsam_core.methods import ENCODER_SAM_INPUT

    from .speed import _machine, find_chd_dataset

    precisions = parse_list(args.precisions, "--precisions", str, ENCODER_PRECISIONS[1:])
    batch_sizes = parse_list(args.batch_sizes, "--batch-sizes", int)
    if args.slices < 1 or args.repeats < 1:
        raise NNSAMError("--slices and --repeats must be at least 1")
    data_dir = None if args.synthetic else find_chd_dataset(args.data)
    slices, description = normalised_slices(args.slices, data_dir)
    batch = torch.from_numpy(np.stack(slices))[:, None]
    started = datetime.datetime.now(datetime.timezone.utc)
    device = torch.device("cpu")
    result = {"command": "nnsam-lab " + " ".join(sys.argv[1:]), "date_utc": started.isoformat(timespec="seconds"),
              "machine": _machine(device), "data": description, "encoder": args.encoder,
              "native_cpu_bfloat16": native_cpu_bfloat16(), "auto_resolves_to": resolve_cpu_precision("auto"),
              "slices": args.slices, "rows": []}

    def say(message: str) -> None:
        print(f"[bench-encoder {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    embeddings = {}
    for precision in precisions:
        encoder = load_encoder(args.encoder, pretrained=not args.random_encoder, precision=precision,
                               preparation=ENCODER_SAM_INPUT[args.encoder])  # as nnsam train feeds it
        encoder(batch[:1])  # warm-up: first-call allocations and kernel selection are not the steady state
        for size in batch_sizes:
            times = []
            for _ in range(args.repeats):
                chunks = []
                t0 = time.perf_counter()
                for start in range(0, len(batch), size):
                    chunks.append(encoder(batch[start:start + size]))
                times.append((time.perf_counter() - t0) / len(batch))
            embeddings.setdefault(precision, torch.cat(chunks))
            row = {"precision": precision, "batch_size": size, "s_per_slice": statistics.median(times),
                   "s_per_slice_runs": [round(t, 4) for t in times]}
            result["rows"].append(row)
            say(f"{precision}, batch {size}: {row['s_per_slice']:.3f} s per slice")

    errors = {}
    reference = embeddings.get("float32")
    if reference is not None and args.noise_reference > 0:
        # A yardstick for the errors: how far float32 embeddings move when the input gets Gaussian noise of a
        # strength inside nnU-Net's own training augmentation, which the network learns to shrug off.
        say(f"float32 on the slices plus Gaussian noise (sd {args.noise_reference:g}) as a reference")
        generator = torch.Generator().manual_seed(0)
        noisy = batch + args.noise_reference * torch.randn(batch.shape, generator=generator)
        encoder = load_encoder(args.encoder, pretrained=not args.random_encoder, precision="float32",
                               preparation=ENCODER_SAM_INPUT[args.encoder])
        embeddings[NOISE_ROW] = torch.cat([encoder(noisy[s:s + 4]) for s in range(0, len(noisy), 4)])
        result["noise_reference_sd"] = args.noise_reference
    if reference is not None:
        mean = reference.mean(dim=(0, 2, 3))
        std = reference.std(dim=(0, 2, 3)).clamp_min(1e-6)
        for precision, emb in embeddings.items():
            stored = emb.to(torch.float16).float()
            errors[precision] = {
                "raw": embedding_errors(reference, emb),
                "stored_float16_standardised": embedding_errors(standardised(reference, mean, std),
                                                                standardised(stored, mean, std)),
            }
    result["errors_vs_float32"] = errors
    result["wall_s"] = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    machine = result["machine"]
    print(f"nnsam-lab bench-encoder, {result['date_utc']}, {machine.get('cpu', '')}, {machine['cpu_count']} cores, "
          f"{machine['torch_threads']} torch threads; encoder {args.encoder}"
          f"{' (randomly initialised)' if args.random_encoder else ''}; data: {description}, {args.slices} slices")
    print(f"native bfloat16 on this CPU: {'yes' if result['native_cpu_bfloat16'] else 'no'}; "
          f"precision 'auto' runs {result['auto_resolves_to']}")
    print(format_encoder_table(result))
    return 0


def format_encoder_table(result: dict) -> str:
    errors = result.get("errors_vs_float32", {})
    timed = [(row["precision"], str(row["batch_size"]), f"{row['s_per_slice']:.3f}") for row in result["rows"]]
    if NOISE_ROW in errors:
        timed.append((f"float32, input + noise sd {result['noise_reference_sd']:g} (reference)", "", ""))
    rows = [("precision", "batch", "s per slice", "rel. L2 vs float32 (mean / max)", "cosine (mean / min)",
             "after float16 + standardise: rel. L2 (mean / max)")]
    for precision, batch, seconds in timed:
        key = NOISE_ROW if precision.startswith("float32, input") else precision
        e = errors.get(key)
        raw = e["raw"] if e else None
        std = e["stored_float16_standardised"] if e else None
        rows.append((precision, batch, seconds,
                     f"{raw['relative_l2_mean']:.4f} / {raw['relative_l2_max']:.4f}" if raw else "n/a",
                     f"{raw['cosine_mean']:.5f} / {raw['cosine_min']:.5f}" if raw else "n/a",
                     f"{std['relative_l2_mean']:.4f} / {std['relative_l2_max']:.4f}" if std else "n/a"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
        if k == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def add_bench_encoder_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench-encoder", help="time the frozen encoder on the CPU per precision and batch size, and measure "
        "each precision's error against float32 on real slices",
        description="Time the frozen SAM encoder alone on the CPU (seconds per slice, median of --repeats passes "
        "over the slices) for each precision and batch size, and compare each precision's embeddings with "
        "float32's on the same slices: relative L2 and cosine, raw and after the bank's float16 storage and "
        "per-channel standardisation (what the network sees).")
    p.add_argument("--encoder", choices=ENCODER_NAMES, default=ENCODER_NAMES[0])
    p.add_argument("--random-encoder", action="store_true", help="the architecture randomly initialised "
                   "(timing only: its errors say nothing about the pretrained encoder's)")
    p.add_argument("--precisions", default="float32,bfloat16", help="comma-separated: float32, bfloat16 "
                   "(default both; errors need float32 among them)")
    p.add_argument("--batch-sizes", default="1,4", help="comma-separated encoder batch sizes (default 1,4)")
    p.add_argument("--slices", type=int, default=8, help="real slices to encode (default 8)")
    p.add_argument("--repeats", type=int, default=2, help="timed passes over the slices (default 2)")
    p.add_argument("--data", help="the Dataset901_CHD raw dataset folder (default: ../shared/data/ if present)")
    p.add_argument("--synthetic", action="store_true", help="synthetic slices even when the cardiac data exist")
    p.add_argument("--noise-reference", type=float, default=0.1, metavar="SD",
                   help="also compare float32 embeddings of the slices plus Gaussian noise of this standard "
                   "deviation (on the z-scored slice; nnU-Net's training augmentation adds up to about 0.3) as a "
                   "yardstick for the errors (default 0.1; 0 skips)")
    p.add_argument("--json", metavar="OUT", help="also write every number as JSON to OUT")
    p.set_defaults(func=run_bench_encoder)
    return p
