"""The SAM branch's settings: one typed NNSAMConfig from the command line to the network, the light catalogue of
trainers and its agreement with the classes, old records read as they trained, and removed options refused."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("argv, expected", [
    ([], None),                                                        # the trainer's own configuration
    (["--recompute-share", "0.1"], None),                              # the default, said aloud: still the trainer's
    (["--recompute-share", "0.25"], {"recompute_share": 0.25, "embeddings": "cached", "encoder": "litemedsam"}),
    (["--recompute-share", "0", "--encoder", "mobilesam"], {"recompute_share": 0.0, "encoder": "mobilesam",
                                                            "sam_input": "nnunet"}),
])
def test_train_command_passes_the_sam_branch_it_was_given(chest_ct, tmp_path, monkeypatch, argv, expected):
    import nnsam_core.finetune as finetune
    from nnsam_core.cli import main

    received = {}
    monkeypatch.setattr(finetune, "fine_tune", lambda *args, **kwargs: received.update(kwargs))
    assert main(["train", *chest_ct, "-o", str(tmp_path / "m"), "--progress", "none", *argv]) == 0
    config = received["nnsam_config"]
    if expected is None:
        assert config is None
    else:
        assert {name: getattr(config, name) for name in expected} == expected


@pytest.mark.parametrize("argv, message", [
    (["--recompute-share", "1.5"], "--recompute-share must be 0 to 1"),
    (["--recompute-share", "nan"], "--recompute-share must be 0 to 1"),
    (["--recompute-share", "0.5", "--method", "nnunet"], "method nnunet has none"),
])
def test_train_command_refuses_a_share_it_cannot_use(chest_ct, tmp_path, capsys, argv, message):
    from nnsam_core.cli import main

    assert main(["train", *chest_ct, "-o", str(tmp_path / "m"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("option", ["--embedding-variants", "--embedding-views", "--mirror-embeddings",
                                    "--inject-stride", "--embedding-norm", "--sam-input", "--keep-work-dir"])
def test_study_options_are_not_on_the_user_command_line(option, chest_ct, tmp_path, capsys):
    from nnsam_core.cli import build_parser, main

    assert option not in build_parser().format_help()
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *chest_ct, "-o", str(tmp_path / "m"), option, "1"])
    assert exit_info.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["nnsam-random", "nnsam-recomputed"])
def test_lab_methods_are_not_offered_to_users_but_stay_in_the_api(method):
    from nnsam_core.cli import build_parser
    from nnsam_core.methods import METHODS
    from nnsam_core.training.registry import trainer_for

    assert method not in build_parser().format_help() and method in METHODS
    assert trainer_for(method, "litemedsam").nnsam_config.method == method


def test_train_help_lists_at_most_fifteen_options():
    from nnsam_core.cli import build_parser

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    listed = [a for a in train._actions if a.option_strings and a.help != "==SUPPRESS==" and a.dest != "help"]
    assert 0 < len(listed) <= 15, [a.option_strings for a in listed]


def test_catalogue_and_trainer_classes_agree():
    from nnsam_core.config import NNSAMConfig
    from nnsam_core.methods import TRAINER_CATALOGUE, TRAINER_FOR
    from nnsam_core.training.registry import TRAINER_CLASSES, config_of_trainer

    assert set(TRAINER_CATALOGUE) == set(TRAINER_CLASSES)
    for name, entry in TRAINER_CATALOGUE.items():
        config = config_of_trainer(TRAINER_CLASSES[name])
        assert config == (None if entry.config is None else NNSAMConfig(**entry.config)), name
        assert entry.method == (config.method if config else "nnunet"), name
    assert set(TRAINER_FOR.values()) <= set(TRAINER_CATALOGUE)


def test_old_records_read_as_they_trained_and_removed_experiments_are_ignored():
    from nnsam_core.config import NNSAMConfig

    # a record from before sam_input and recompute_share existed, with the removed cache experiments set
    old = {"encoder": "litemedsam", "pretrained": True, "random_seed": 0, "inject_stride": 8,
           "embedding_norm": "standardise", "embeddings": "cached", "embedding_variants": 4,
           "mirror_embeddings": True, "embedding_views": 2}
    config = NNSAMConfig.from_dict(old)
    assert config.sam_input == "nnunet" and config.recompute_share == 0.0
    assert not hasattr(config, "embedding_variants")
    assert NNSAMConfig.from_dict(config.as_dict()) == config
    assert NNSAMConfig().recompute_share == 0.1 and NNSAMConfig().sam_input == "unit-range"
    # nnU-Net results folders without a record: the trainer's own settings, with the cache alone
    assert NNSAMConfig.of_trainer("nnUNetTrainerNNSAM").recompute_share == 0.0
    assert NNSAMConfig.of_trainer("nnUNetTrainerNNSAM", {"recompute_share": 0.1}).recompute_share == 0.1
    assert NNSAMConfig.of_trainer("nnUNetTrainerFewShot") is None


@pytest.mark.parametrize("field, value", [("encoder", "vit_h"), ("inject_stride", 3), ("embedding_norm", "l2"),
                                          ("sam_input", "imagenet"), ("embeddings", "sometimes"),
                                          ("recompute_share", 2.0)])
def test_a_config_refuses_values_the_network_cannot_honour(field, value):
    from nnsam_core.config import NNSAMConfig

    with pytest.raises(ValueError, match=field):
        NNSAMConfig(**{field: value})


def test_importing_the_bundle_format_does_not_import_the_training_stack():
    code = ("import sys, nnsam_core.bundle, nnsam_core.cli\n"
            "heavy = [m for m in sys.modules if m.startswith(('nnunetv2.training', 'batchgeneratorsv2', "
            "'nnsam_core.training', 'nnsam_lab'))]\n"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_the_engine_never_imports_the_lab():
    from pathlib import Path

    engine = Path(__import__("nnsam_core").__file__).parent
    offenders = [str(p) for p in engine.rglob("*.py") if "nnsam_lab" in p.read_text()]
    assert offenders == []


def test_bundle_info_reads_a_bundle_without_the_training_stack(trained):
    bundle, _ = trained
    code = ("import sys\nfrom nnsam_core.cli import main\n"
            f"assert main(['bundle', 'info', {str(bundle.path)!r}]) == 0\n"
            "heavy = [m for m in sys.modules if m.startswith(('nnunetv2.training', 'batchgeneratorsv2', "
            "'nnsam_core.training'))]\n"
            "print('HEAVY', heavy)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert '"nnsam_config"' in run.stdout and run.stdout.strip().splitlines()[-1] == "HEAVY []"
