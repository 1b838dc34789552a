"""The ``nnsam evaluate`` verb: argparse wiring around :func:`nnsam_core.evaluation.evaluate.evaluate`."""

from __future__ import annotations

import argparse

from nnsam_core.evaluation.evaluate import (
    evaluate,
    format_table,
    parse_class_specs,
    parse_slice_specs,
    write_json,
)

DESCRIPTION = """\
Score predicted label maps against ground truth: per-class Dice (%) and average symmetric surface
distance (ASD, mm, from the image spacing), per case and as mean ± SD over cases (or slices).

PRED and GT are each a label image (.nii.gz, .nii, .nrrd, .mha, .png, ...) or a folder of them,
matched by case name (nnU-Net style case.nii.gz). Pred and GT must share size, spacing, origin and
direction. Single-slice cases are scored in 2D, volumes in 3D unless --per-slice.

Empty masks: a class absent from both pred and GT is not scored (Dice/ASD NaN, counted as "both
empty"); present in only one: Dice 0 and ASD NaN (counted as "one empty"). NaN is left out of
means; JSON writes it as null.
"""

EPILOG = """\
examples:
  nnsam evaluate predictions/ Dataset027_ACDC/labelsTr/ --classes 1=RV 2=MYO 3=LV --json scores.json
  nnsam evaluate pred/case_001.nii.gz gt/case_001.nii.gz --per-slice --exclude-slices 0 4 8
"""


def add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``evaluate`` verb on an argparse subparsers object; sets ``func=run_evaluate``."""
    parser = subparsers.add_parser(
        "evaluate",
        help="Dice and ASD of predictions against ground truth",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("pred", metavar="PRED", help="predicted label image, or folder of them")
    parser.add_argument("gt", metavar="GT", help="ground-truth label image, or folder of them")
    parser.add_argument(
        "--classes",
        nargs="+",
        metavar="VALUE[=NAME]",
        help="label values to score, optionally named (e.g. 1=LV 2=RV); default: every nonzero value "
        "in GT, named from a dataset.json beside or above GT if there is one",
    )
    parser.add_argument("--json", metavar="OUT", help="also write the full report (per case and summary) to OUT")
    parser.add_argument(
        "--per-slice",
        action="store_true",
        help="score each axial slice (k, SimpleITK's third axis) that has ground truth separately in 2D",
    )
    parser.add_argument(
        "--slices",
        nargs="+",
        metavar="K",
        help="with --per-slice: score only these k indices, in every case (e.g. 3 5-7)",
    )
    parser.add_argument(
        "--exclude-slices",
        nargs="+",
        metavar="K",
        help="with --per-slice: leave out these k indices, e.g. the slices annotated for training",
    )
    parser.add_argument("--show-cases", action="store_true", help="print one line per case (or slice) too")
    parser.set_defaults(func=run_evaluate)
    return parser


def run_evaluate(args: argparse.Namespace) -> int:
    """Evaluate, print the table, write JSON if asked; NNSAMError for problems the user can fix."""
    report = evaluate(
        args.pred,
        args.gt,
        classes=parse_class_specs(args.classes) if args.classes else None,
        per_slice=args.per_slice,
        slices=parse_slice_specs(args.slices) if args.slices else None,
        exclude_slices=parse_slice_specs(args.exclude_slices) if args.exclude_slices else None,
    )
    print(format_table(report, show_cases=args.show_cases))
    if args.json:
        write_json(report, args.json)
        print(f"Wrote {args.json}")
    return 0
