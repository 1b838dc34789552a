"""The ``nnsam-lab benchmark`` verb (registered by nnsam_lab.cli through :func:`add_benchmark_parser`)."""

from __future__ import annotations

import argparse

from nnsam_core.errors import NNSAMError
from nnsam_core.methods import (DEFAULT_RECOMPUTE_SHARE, ENCODER_NAMES, INJECT_STRIDES, LAB_METHOD_HELP, SAM_INPUTS,
                                check_recompute_share)

from .adapt import START_FROM_HELP, START_FROM_METHODS
from .fill import BENCH_METHODS, FILL_HELP

DESCRIPTION = """\
Compare nnSAM with nnU-Net (and, as a control, nnSAM with a random frozen encoder) when few slices are annotated.

Labelled-slices protocol (default; the nnSAM paper's Table 1): the labelled 2D slices of DATASET_DIR (one-slice
cases, or the labelled slices of volume cases) are split once, with a fixed seed, into test slices and an ordered
pool; the training set of size n is the first n slices of the pool (nested: the 4 are inside the 8). Every method
trains on the same slices with the same seed and preset, then segments every test slice, which is scored in 2D.
  --split patient: test patients never appear in training (default when case names carry a patient id:
                   <patient>_<slice> for one-slice cases; a volume case is one patient).
  --split slice:   slices of one patient may fall on both sides (the paper's kind of partition).

In-volume protocol (--in-volume): for each volume, k evenly spaced labelled slices are the only annotation; the
model fine-tuned on them segments the volume and the remaining labelled slices are scored; mean ± SD over volumes.
  One-slice cases named <patient>_<slice index> are grouped into one sparse volume per patient (its labelled
  slices in slice order); fill-between places them at their slice index, and missing slices are not scored.
  The headline is the 3D Dice of each structure over all scored slices of a volume (their voxels pooled), mean
  over structures, then over volumes; the per-slice 2D mean stands beside it. --methods fill-between adds the
  clinician's baseline (Slicer's "Fill between slices" on the annotated slices, no training) and every method
  is compared with it. --start-from BUNDLE measures a saved model: alone (base-model) and adapted to each
  volume's painted slices (adapt, adapt-chained); keep the base model's training patients out of the volumes.

REPORT_DIR gets report.md (Table 1 layout, per-class Tables 2 and 3), results.csv (every slice and class),
dice_vs_size.png and examples.png; in-volume reports also volumes.csv (3D Dice of every volume and structure). Finished runs are kept under REPORT_DIR/runs and never redone, so an
interrupted benchmark continues where it stopped and a later call can add methods, sizes or seeds."""

EPILOG = """\
examples:
  nnsam-lab benchmark ../shared/data/Dataset901_CHD -o chd_report --sizes 4 20 --methods nnsam nnunet nnsam-random \\
      --classes LV RV LA RA Myo --iterations 100
  nnsam-lab benchmark --in-volume ../shared/data/Dataset902_MSCMR -o mscmr_invol --annotated 2 3 --volumes 4
  nnsam-lab benchmark --in-volume ../shared/data/Dataset902_MSCMR -o mscmr_fill --methods fill-between
  nnsam-lab benchmark --in-volume ../shared/data/Dataset901_CHD -o chd_fill --methods fill-between --annotated 2 3
  nnsam-lab benchmark --in-volume ../shared/data/Dataset902_MSCMR -o mscmr_adapt --annotated 1 2 \
      --cases mscmr_03 mscmr_15 --start-from cine_mr_base --methods base-model adapt adapt-chained
  nnsam-lab benchmark ../shared/data/Dataset901_CHD -o chd_report --sizes 4 8 --dry-run   # show split and runs"""


def add_benchmark_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("benchmark", help="compare nnSAM and nnU-Net on few annotated slices",
                                   description=DESCRIPTION, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", metavar="DATASET_DIR", help="nnU-Net raw dataset folder (dataset.json, imagesTr, "
                        "labelsTr); one-slice cases or volumes")
    parser.add_argument("-o", "--output", required=True, metavar="REPORT_DIR",
                        help="report folder; reused to resume (settings must match)")
    parser.add_argument("--in-volume", action="store_true",
                        help="in-volume protocol: annotate k slices of each volume, score the others")
    parser.add_argument("--methods", nargs="+", default=["nnsam", "nnunet"],
                        choices=BENCH_METHODS + START_FROM_METHODS,
                        help="default: nnsam nnunet. " + LAB_METHOD_HELP + "; " + FILL_HELP + "; " + START_FROM_HELP)
    parser.add_argument("--start-from", metavar="BUNDLE",
                        help="in-volume protocol: the saved model the start-from methods use (nnsam train "
                        "--start-from); its own settings, not --encoder or --recompute-share, apply to them")
    parser.add_argument("--sizes", nargs="+", type=int, default=[4, 8, 12, 16, 20], metavar="N",
                        help="training set sizes in slices (labelled-slices protocol; default: 4 8 12 16 20)")
    parser.add_argument("--split", choices=("patient", "slice"),
                        help="labelled-slices protocol: patient (default when case names carry a patient id) or slice")
    parser.add_argument("--test-fraction", type=float, default=1 / 3, metavar="F",
                        help="share of the labelled slices kept for testing (default: 1/3)")
    parser.add_argument("--annotated", nargs="+", type=int, default=[2, 3, 4], metavar="K",
                        help="in-volume protocol: annotated slices per volume (default: 2 3 4)")
    parser.add_argument("--volumes", type=int, metavar="N",
                        help="in-volume protocol: N volumes spread evenly over the sorted case names (default: all)")
    parser.add_argument("--cases", nargs="+", metavar="CASE", help="in-volume protocol: these volume cases instead")
    parser.add_argument("--classes", nargs="+", metavar="NAME",
                        help="classes of the headline mean (Table 1), e.g. LV RV LA RA Myo; the others are "
                             "reported separately (default: all classes)")
    parser.add_argument("--encoder", choices=ENCODER_NAMES, default=ENCODER_NAMES[0])
    parser.add_argument("--sam-input", choices=SAM_INPUTS,
                        help="SAM input preparation of nnsam and nnsam-random (default: the encoder's own, as "
                        "nnsam train)")
    parser.add_argument("--inject-stride", type=int, choices=INJECT_STRIDES,
                        help="nnsam methods inject the SAM embedding at the skip with this downsampling (default: "
                        "the trainer's, 8, the authors'); for studying the injection stage")
    parser.add_argument("--recompute-share", type=float, metavar="P",
                        help="nnsam methods with cached embeddings run the encoder on the augmented patches at a "
                        f"random share P of the training steps (default: nnsam train's, {DEFAULT_RECOMPUTE_SHARE:g}; 0: "
                        "the cache at every step)")
    parser.add_argument("--preset", choices=("quick", "full"), default="quick",
                        help="training schedule of every run (quick: 1000 iterations; full: the paper's)")
    parser.add_argument("--iterations", type=int, metavar="N", help="override the preset's iteration count")
    parser.add_argument("--learning-rate", type=float, metavar="LR",
                        help="initial learning rate of every trained run (default: nnsam train's; nnU-Net's 0.01 "
                        "afresh, the engine's adaptation rate with --start-from)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="S",
                        help="training seeds; the split does not depend on them (default: 0)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto")
    parser.add_argument("--downsample", type=int, default=1, metavar="F",
                        help="shrink images in-plane by F before training and scoring (for CPU budgets; default 1)")
    parser.add_argument("--keep-models", action="store_true",
                        help="keep each run's model bundle under REPORT_DIR/runs (100-200 MB each at 512x512)")
    parser.add_argument("--note", default="", help="free text recorded with this invocation in the report")
    parser.add_argument("--dry-run", action="store_true", help="print the split (or volumes) and the runs; train nothing")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the report from the finished runs in REPORT_DIR; train nothing")
    parser.set_defaults(func=run_benchmark_command)
    return parser


def run_benchmark_command(args) -> int:
    from pathlib import Path

    if args.report_only:
        from .report import write_report
        if not (Path(args.output) / "benchmark.json").is_file():
            raise NNSAMError(f"{args.output} holds no benchmark.json; run a benchmark into it first")
        print(f"report: {write_report(args.output, args.classes)['report']}")
        return 0
    from .runner import Plan, Settings, run_in_volume_benchmark, run_slices_benchmark

    if args.iterations is not None and args.iterations < 1:
        raise NNSAMError("--iterations must be at least 1")
    if args.learning_rate is not None and not 0 < args.learning_rate <= 1:
        raise NNSAMError("--learning-rate must be above 0 and at most 1")
    if args.downsample < 1:
        raise NNSAMError("--downsample must be a whole number >= 1")
    if any(n < 1 for n in args.sizes) or any(k < 1 for k in args.annotated):
        raise NNSAMError("--sizes and --annotated must be positive")
    if args.recompute_share is not None:
        check_recompute_share(args.recompute_share)
    dataset = Path(args.dataset)
    if not dataset.is_dir():
        raise NNSAMError(f"dataset folder {dataset} does not exist; give an nnU-Net raw dataset folder")
    protocol = "in-volume" if args.in_volume else "slices"
    settings = Settings(protocol=protocol, dataset=str(dataset.resolve()), encoder=args.encoder, preset=args.preset,
                        iterations=args.iterations, learning_rate=args.learning_rate, downsample=args.downsample,
                        split=args.split if not args.in_volume else None,
                        test_fraction=args.test_fraction if not args.in_volume else None, device=args.device,
                        sam_input=args.sam_input, inject_stride=args.inject_stride,
                        recompute_share=args.recompute_share)
    plan = Plan(settings=settings, methods=list(dict.fromkeys(args.methods)),
                sizes=sorted(set(args.sizes)) if not args.in_volume else [],
                annotated=sorted(set(args.annotated)) if args.in_volume else [],
                seeds=list(dict.fromkeys(args.seeds)), volumes=list(args.cases or []),
                report_classes=args.classes, keep_models=args.keep_models, note=args.note,
                start_from=str(Path(args.start_from).resolve()) if args.start_from else None)
    if args.in_volume:
        run_in_volume_benchmark(dataset, args.output, plan, count=args.volumes, dry_run=args.dry_run)
    else:
        run_slices_benchmark(dataset, args.output, plan, dry_run=args.dry_run)
    return 0
