"""The ``nnsam`` command line. Every verb has --help; user errors print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from .errors import NNSAMError
from .evaluation.command import add_evaluate_parser
from .methods import DEFAULT_RECOMPUTE_SHARE, ENCODER_NAMES, METHOD_HELP, USER_METHODS, check_recompute_share

EPILOG = "Slices are indices along the image's third axis (axial for an axial CT; Slicer's K)."


def _add_progress(parser):
    parser.add_argument("--progress", choices=("text", "json", "none"), default="text",
                        help="text: a progress bar; json: one JSON object per line on stdout (for the Slicer module)")


def _add_device(parser):
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                        help="auto picks CUDA, then MPS, then CPU (default: auto)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnsam", description="nnSAM: few-shot segmentation with nnU-Net v2 and a "
                                     "frozen SAM encoder.", epilog=EPILOG)
    from . import __version__
    parser.add_argument("--version", action="version", version=f"nnsam {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True

    train = verbs.add_parser("train", help="fine-tune a model on annotated slices and save a bundle",
                             description="Fine-tune on the annotated slices of IMAGE (LABELS: label map or Slicer "
                             ".seg.nrrd), or on every case of an nnU-Net raw dataset (DATASET_DIR alone), and write a model bundle.",
                             epilog=EPILOG)
    train.add_argument("image", nargs="?", metavar="IMAGE|DATASET_DIR",
                       help="image file (NIfTI, NRRD, MHA, ...) or DICOM folder; or, alone, an nnU-Net raw dataset "
                       "folder (dataset.json, imagesTr, labelsTr) to train on all of its cases")
    train.add_argument("labels", nargs="?", metavar="LABELS", help="label map with the image's geometry, or a .seg.nrrd")
    train.add_argument("-o", "--output", required=True, help="bundle folder to write")
    train.add_argument("--dataset", help=argparse.SUPPRESS)  # the earlier spelling of DATASET_DIR alone
    train.add_argument("--slices", help="annotated slice indices, e.g. 12,40,77 (default: every slice with a label)")
    train.add_argument("--class-names", help="names of label values 1..N, e.g. LV,RV,LA,RA,Myo")
    train.add_argument("--encoder", choices=ENCODER_NAMES,
                       help="frozen SAM encoder: litemedsam (default, shipped, medical images) or mobilesam (the "
                       "paper's; weights: nnsam weights download mobilesam)")
    train.add_argument("--method", choices=USER_METHODS, help=METHOD_HELP)
    train.add_argument("--start-from", metavar="BUNDLE",
                       help="adapt this saved model to the new scan (its classes, encoder and method; a short "
                       "schedule) instead of training from scratch; it is only read")
    train.add_argument("--preset", choices=("quick", "full"), default="quick",
                       help="quick: 1000 iterations; full: nnU-Net's 1000 epochs x 250 iterations")
    train.add_argument("--iterations", type=int, help="override the preset's number of training iterations "
                       "(rounded up to whole epochs of 25; the bundle records the number trained)")
    train.add_argument("--max-size", type=int, metavar="PIXELS",
                       help="largest in-plane size nnU-Net trains at; results keep the image's resolution (default: "
                       "192 for the quick preset on a CPU, else the native resolution; 0 = always native)")
    train.add_argument("--recompute-share", type=float, metavar="P",
                       help="share of the training steps (0 to 1) that run the SAM encoder on the augmented patches; "
                       "the others reuse each slice's cached embedding (default "
                       f"{DEFAULT_RECOMPUTE_SHARE:g}; 0: the cache alone, the fastest)")
    train.add_argument("--modality", default="CT", help="nnU-Net channel name deciding normalisation (CT, MR, ...)")
    _add_device(train)
    train.add_argument("--resume", action="store_true", help="continue a stopped training of the same bundle")
    train.add_argument("--overwrite", action="store_true", help="replace an existing bundle at -o")
    _add_progress(train)
    train.set_defaults(func=_train)

    predict = verbs.add_parser("predict", help="segment every slice of an image with a bundle",
                               description="Segment every axial slice of IMAGE with BUNDLE; the label map keeps "
                               "the image's size, spacing, origin and direction.")
    predict.add_argument("bundle", help="bundle folder or .zip")
    predict.add_argument("image", help="image file or DICOM folder")
    predict.add_argument("-o", "--output", required=True, help="label map to write (.nii.gz, .nrrd, ...)")
    predict.add_argument("--overwrite", action="store_true", help="replace an existing file at -o")
    predict.add_argument("--no-mirroring", action="store_true",
                         help="skip test-time mirroring: about 4x less network time (CPU), slightly less accurate")
    _add_device(predict)
    _add_progress(predict)
    predict.set_defaults(func=_predict)

    weights = verbs.add_parser("weights", help="encoder weights: status, download, import")
    wverbs = weights.add_subparsers(dest="weights_verb", metavar="ACTION")
    wverbs.required = True
    status = wverbs.add_parser("status", help="which encoder weights are available")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=_weights_status)
    imp = wverbs.add_parser("import", help="import a local weights file (offline sites)")
    imp.add_argument("encoder", choices=("mobilesam",))
    imp.add_argument("file")
    imp.set_defaults(func=_weights_import)
    down = wverbs.add_parser("download", help="download and verify weights into the cache")
    down.add_argument("encoder", choices=("mobilesam",))
    _add_progress(down)
    down.set_defaults(func=_weights_download)

    bundle = verbs.add_parser("bundle", help="bundles: info, export .zip, import .zip")
    bverbs = bundle.add_subparsers(dest="bundle_verb", metavar="ACTION")
    bverbs.required = True
    info = bverbs.add_parser("info", help="check a bundle and print its nnsam.json")
    info.add_argument("bundle")
    info.set_defaults(func=_bundle_info)
    exp = bverbs.add_parser("export", help="export a bundle folder as a .zip")
    exp.add_argument("bundle")
    exp.add_argument("zip")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing .zip")
    exp.set_defaults(func=_bundle_export)
    bimp = bverbs.add_parser("import", help="check and unpack a .zip bundle into a folder")
    bimp.add_argument("zip")
    bimp.add_argument("output")
    bimp.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    bimp.set_defaults(func=_bundle_import)

    estimate = verbs.add_parser("estimate", help="how long a fine-tune and the segmentation will take here",
                                description="The expected time of fine-tuning on K painted slices of IMAGE and "
                                "segmenting all of its slices on this machine's device. Reads only the image's "
                                "header; the first estimate for a kind of job measures this device for a few "
                                "seconds to a minute, later ones reuse the measurement.", epilog=EPILOG)
    estimate.add_argument("image", help="image file or DICOM folder")
    estimate.add_argument("--slices", metavar="K|LIST", default=str(DEFAULT_PAINTED),
                          help="how many slices you paint (a number, e.g. 5) or which ones (e.g. 12,40,77); "
                          f"default {DEFAULT_PAINTED}")
    estimate.add_argument("--method", choices=USER_METHODS, default="nnsam", help=METHOD_HELP)
    estimate.add_argument("--encoder", choices=ENCODER_NAMES, default=ENCODER_NAMES[0],
                          help="frozen SAM encoder (default litemedsam)")
    _add_device(estimate)
    estimate.add_argument("--preset", choices=("quick", "full"), default="quick",
                          help="the training schedule, as nnsam train's (default quick)")
    estimate.add_argument("--iterations", type=int, help="override the preset's number of training iterations")
    estimate.add_argument("--max-size", type=int, metavar="PIXELS", help="as nnsam train's --max-size")
    estimate.add_argument("--recompute-share", type=float, metavar="P", help="as nnsam train's --recompute-share")
    estimate.add_argument("--remeasure", action="store_true",
                          help="measure this device again instead of using the stored measurement (e.g. it was "
                          "made while other programs kept the computer busy)")
    estimate.add_argument("--json", action="store_true", help="print one JSON object")
    estimate.set_defaults(func=_estimate)

    add_evaluate_parser(verbs)
    return parser


def _reporter(args, stream=None):
    from .progress import Reporter
    return Reporter(args.progress, stream or sys.stdout)


def _train(args) -> int:
    from .finetune import fine_tune

    if args.dataset is None and args.image is not None and args.labels is None:
        if not (Path(args.image) / "dataset.json").is_file():
            raise NNSAMError(f"give IMAGE and LABELS, or an nnU-Net raw dataset folder alone ({args.image} holds no "
                             "dataset.json)")
        args.dataset, args.image = args.image, None
    if args.dataset is None and (args.image is None or args.labels is None):
        raise NNSAMError("give IMAGE and LABELS, or an nnU-Net raw dataset folder alone")
    if args.dataset is not None and (args.image or args.labels):
        raise NNSAMError("give either IMAGE and LABELS or a dataset folder, not both")
    from .images import parse_slices
    slices = parse_slices(args.slices) if args.slices is not None else None  # range checked against the image
    names = [n.strip() for n in args.class_names.split(",")] if args.class_names else None
    if names is not None and (not all(names) or len(set(names)) != len(names)):
        raise NNSAMError(f"--class-names '{args.class_names}' must be distinct, non-empty names, e.g. LV,RV,Myo")
    config = None
    if args.recompute_share is not None:
        check_recompute_share(args.recompute_share)
        if args.method == "nnunet":
            raise NNSAMError("--recompute-share applies to nnSAM's embeddings; method nnunet has none")
        from dataclasses import replace

        base = _base_config(args)
        # the trainer's own settings stay None, so a resumed run keeps what it started with
        config = None if base.recompute_share == args.recompute_share else replace(base,
                                                                                    recompute_share=args.recompute_share)
    fine_tune(args.image, args.labels, output=args.output, nnsam_config=config, slices=slices, class_names=names,
              dataset_dir=args.dataset, encoder=args.encoder, method=args.method, preset=args.preset,
              iterations=args.iterations, device=args.device, modality=args.modality, resume=args.resume,
              overwrite=args.overwrite, start_from=args.start_from, max_size=args.max_size,
              progress=_reporter(args))
    return 0


def _base_config(args):
    """The SAM settings a --recompute-share modifies: the saved model's when adapting one, else the method's."""
    from .config import NNSAMConfig
    from .methods import TRAINER_CATALOGUE, trainer_name_for

    if args.start_from:
        from .bundle import Bundle
        config = Bundle.load(args.start_from).nnsam_config
        if config is None:
            raise NNSAMError("--recompute-share applies to nnSAM's embeddings; the --start-from model has none")
        return config
    return NNSAMConfig(**TRAINER_CATALOGUE[trainer_name_for(args.method or "nnsam", args.encoder or
                                                           ENCODER_NAMES[0])].config)


def _predict(args) -> int:
    from .bundle import Bundle
    from .images import read_image
    from .predict import Segmenter, write_image_atomically
    from .progress import make_event

    from .outputs import check_file_output

    report = _reporter(args)
    output = check_file_output(args.output, [args.image, args.bundle], args.overwrite)
    bundle = Bundle.load(args.bundle)
    image = read_image(args.image)
    labels = Segmenter(bundle, args.device, use_mirroring=not args.no_mirroring).segment(image, report)
    write_image_atomically(labels, output)
    report(make_event("done", 1, 1, message=f"label map written to {args.output}"))
    return 0


DEFAULT_PAINTED = 5  # painted slices assumed when --slices is not given


def _estimate(args) -> int:
    from .estimate import EstimateSettings, estimate

    text = str(args.slices).strip()
    if text.isdigit():
        painted = int(text)
    else:
        from .images import parse_slices
        painted = parse_slices(text)  # checked against the image's slices by estimate()
    settings = EstimateSettings(method=args.method, encoder=args.encoder, device=args.device, preset=args.preset,
                                iterations=args.iterations, max_size=args.max_size, recompute_share=args.recompute_share)

    def say_measuring() -> None:
        print("measuring this computer's speed for this kind of job (once; a few seconds to a minute)...",
              file=sys.stderr, flush=True)

    result = estimate(args.image, painted, settings, on_measure=say_measuring, remeasure=args.remeasure)
    print(json.dumps(result.as_dict()) if args.json else result.summary(), flush=True)
    if result.measured_while_busy:
        print("note: other programs kept this computer busy while its speed was measured, so the estimate may be "
              "too long; it is measured again once the computer is quieter", file=sys.stderr, flush=True)
    return 0


def _weights_status(args) -> int:
    from .weights import status
    rows = status()
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
    else:
        for r in rows:
            state = "available" if r.available else "missing"
            print(f"{r.encoder:<11} {state:<9} {r.path or ''} {('sha256 ' + r.sha256[:16] + '...') if r.sha256 else ''}"
                  f"  ({r.source})")
    return 0


def _weights_import(args) -> int:
    from .weights import import_mobilesam
    path = import_mobilesam(args.file)
    print(f"mobilesam weights verified and stored at {path}")
    return 0


def _weights_download(args) -> int:
    from .progress import make_event
    from .weights import download_mobilesam
    report = _reporter(args)
    path = download_mobilesam(progress=lambda done, total: report(
        make_event("download", done // 1024, total // 1024, message="kB of mobile_sam.pt")))
    report(make_event("done", 1, 1, message=f"mobilesam weights verified and stored at {path}"))
    return 0


def _bundle_info(args) -> int:
    from .bundle import Bundle
    print(json.dumps(Bundle.load(args.bundle).manifest, indent=2))
    return 0


def _bundle_export(args) -> int:
    from .bundle_files import export_zip
    print(f"exported {export_zip(args.bundle, args.zip, args.overwrite)}")
    return 0


def _bundle_import(args) -> int:
    from .bundle_files import import_zip
    print(f"imported {import_zip(args.zip, args.output, args.overwrite)}")
    return 0


def interruptible() -> None:
    """Let an interrupt (Stop in Slicer, Ctrl-C) raise KeyboardInterrupt even when this process inherited SIGINT
    ignored, as programs started in the background by a shell do: otherwise Stop could only kill the engine, and
    its clean-up (temporary files, nnU-Net's workers) would never run."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_verb(build_parser(), argv)


def run_verb(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` and run the chosen verb; user errors print one line and exit 2 (shared with nnsam-lab)."""
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)  # third-party deprecation chatter, not for users
    interruptible()
    args = parser.parse_args(_joined_negative_values(sys.argv[1:] if argv is None else list(argv)))
    json_mode = getattr(args, "progress", None) == "json"
    try:
        watch_stop_file()  # inside: a stop that comes at once is still one line, not a traceback
        return int(args.func(args) or 0)
    except NNSAMError as exc:
        return _fail(str(exc), exc.exit_code, json_mode)
    except KeyboardInterrupt:
        return _fail("interrupted; any earlier bundle or output is intact (nnsam train --resume continues a "
                     "training)", 130, json_mode)
    except MemoryError:
        return _fail("out of memory; use a smaller --iterations/preset, --device cpu, or close other programs",
                     3, json_mode)
    except Exception as exc:  # the user gets one line; developers set NNSAM_DEBUG=1 for the traceback
        if os.environ.get("NNSAM_DEBUG"):
            raise
        if exc.__class__.__name__ == "OutOfMemoryError":
            return _fail("the GPU ran out of memory while training; use --device cpu or a smaller preset", 3,
                         json_mode)
        message = " ".join(str(exc).split())[:300]
        return _fail(f"internal error ({exc.__class__.__name__}: {message}); run again with NNSAM_DEBUG=1 and "
                     "report the traceback", 1, json_mode)


STOP_FILE_VARIABLE = "NNSAM_STOP_FILE"
STOP_FILE_POLL_S = 0.5


def watch_stop_file() -> None:
    """Stop as on Ctrl-C when the file named by $NNSAM_STOP_FILE appears. Slicer starts the engine through a
    launcher that forwards no signals, so its Stop button creates this file instead; the usual interrupt clean-up
    then runs (partial outputs removed, checkpoints kept for --resume). The file is left for its creator."""
    import _thread
    import threading
    import time

    path = os.environ.get(STOP_FILE_VARIABLE)
    if not path:
        return

    def watch() -> None:
        while not os.path.exists(path):
            time.sleep(STOP_FILE_POLL_S)
        _thread.interrupt_main()

    threading.Thread(target=watch, name="nnsam-stop-file", daemon=True).start()


def _joined_negative_values(argv: list) -> list:
    """``--slices -1,4`` reaches the slice check (which names the mistake) instead of argparse taking "-1,4"
    for an option."""
    argv = [str(a) for a in argv]
    for i in range(len(argv) - 1):
        if argv[i] == "--slices" and argv[i + 1].startswith("-"):
            argv[i:i + 2] = [f"--slices={argv[i + 1]}"]
            break
    return argv


def _fail(message: str, code: int, json_mode: bool) -> int:
    if json_mode:
        from .progress import make_event
        print(json.dumps(make_event("error", message=message)), flush=True)
    print(f"nnsam: error: {message}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
