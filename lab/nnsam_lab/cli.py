"""The ``nnsam-lab`` command line: the research verbs, apart from the user's ``nnsam``."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from nnsam_core.cli import run_verb

from .benchmark.command import add_benchmark_parser
from .encoder_bench import add_bench_encoder_parser
from .probe import add_probe_parser
from .rawdata import add_raw_dataset_parser
from .speed import add_bench_speed_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnsam-lab", description="Research tools for nnSAM: benchmarks against "
                                     "nnU-Net, speed measurements and an encoder probe.")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    add_benchmark_parser(verbs)
    add_bench_speed_parser(verbs)
    add_bench_encoder_parser(verbs)
    add_probe_parser(verbs)
    add_raw_dataset_parser(verbs)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_verb(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
