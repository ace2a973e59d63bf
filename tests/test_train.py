"""``python -m nanopar.train`` (chapter 4.3): spawned ranks and torchrun, checkpoints, exact resume, clear errors.

Every run pins gloo (CPU ranks on every tier) and a timeout.
"""
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

from nanopar import checkpoint, train
from nanopar.launch import RankError

TORCHRUN = pathlib.Path(sys.executable).parent / "torchrun"
SGD = ["--optimizer", "sgd", "--lr", "0.5", "--batch", "8", "--backend", "gloo", "--timeout", "120"]
GRID = ["--dp", "2", "--pp", "2"]


def shards(out):
    """The latest checkpoint's shard files, by name."""
    manifest = checkpoint.read_manifest(str(out))
    folder = pathlib.Path(out, manifest["folder"])
    return manifest, {f.name: torch.load(f, weights_only=False) for f in sorted(folder.glob("*.pt"))}


def train_to(out, steps, *extra):
    assert train.main([*SGD, *GRID, "--steps", str(steps), "--eval-every", "2", "--checkpoint-every", "2",
                       "--out", str(out), *extra]) == 0


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
    out = tmp_path_factory.mktemp("three_steps")
    train_to(out, 3)
    return out


@pytest.fixture(scope="module")
def five_steps(tmp_path_factory):
    out = tmp_path_factory.mktemp("five_steps")
    train_to(out, 5, "--check-every", "1")  # the replicas' check changes nothing it checks
    return out


def test_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as info:
        train.main(["--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    options = [a for a in train.build_parser()._actions if a.option_strings and a.dest != "help"]
    assert len(options) >= 20
    for action in options:
        assert action.option_strings[0] in text
        assert "(default:" in action.help or "(required)" in action.help, action.dest
    assert "torchrun --standalone --nproc_per_node=4 -m nanopar.train" in text  # the examples


def test_a_run_writes_its_checkpoint_once_per_shard_and_keeps_the_latest(three_steps):
    manifest, files = shards(three_steps)
    assert manifest["step"] == 3 and manifest["topology"]["dp"] == 2 and manifest["run"]["model"] == "gpt"
    assert sorted(files) == ["pp0-tp0.pt", "pp1-tp0.pt"]  # DP replica 0 writes each shard once
    assert sorted(p.name for p in three_steps.iterdir()) == ["latest.json", "step-0000003"]  # step 2's removed
    assert not list(three_steps.rglob("*.tmp*"))


@pytest.mark.parametrize("dp", [2, 1])
def test_a_resumed_run_ends_with_the_parameters_of_an_uninterrupted_one(three_steps, five_steps, tmp_path, dp, capfd):
    # Resumed at step 3 to step 5, on the same grid (then every bit agrees) or with another dp
    # (checkpoints hold shards by pp and tp; the replicas then add their gradients in another order).
    out = tmp_path / "resumed"
    shutil.copytree(three_steps, out)
    assert train.main([*SGD, "--dp", str(dp), "--pp", "2", "--steps", "5", "--eval-every", "2",
                       "--out", str(out), "--resume"]) == 0
    printed = capfd.readouterr().out
    assert "step 4/5: train loss" in printed and "trained gpt steps 4-5 on dp" in printed
    _, resumed = shards(out)
    _, uninterrupted = shards(five_steps)
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        a, b = resumed[name], uninterrupted[name]
        assert a["step"] == b["step"] == 5 and torch.equal(a["data_rng"], b["data_rng"])
        for k in b["model"]:
            if dp == 2:
                assert torch.equal(a["model"][k], b["model"][k]), f"{name} {k}"
            else:
                torch.testing.assert_close(a["model"][k], b["model"][k], msg=lambda m, at=f"{name} {k}": f"{at}: {m}")


def _error(argv, capsys):
    with pytest.raises(SystemExit) as info:
        train.main(argv)
    assert info.value.code == 2
    return " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("argv,message", [
    (["--dp", "3", "--nproc", "4"], "dp × pp × tp = 3 × 1 × 1 = 3 ranks, but the world has 4"),
    (["--pp", "3"], "2 layers do not split evenly into 3 pipeline stages: choose pp among [1, 2]"),
    (["--tp", "3"], "the tiny GPT's 4 heads do not split over --tp 3"),
    (["--dp", "4", "--batch", "6"], "a global batch of 6 does not split over dp = 4 replicas"),
    (["--dp", "2", "--microbatches", "3"], "3 micro-batches do not divide a batch of 4"),
    (["--model", "resnet50", "--tp", "2"], "use --tp 1 with --model resnet50"),
    (["--steps", "0"], "--steps must be a positive integer"),
    (["--resume"], "there is no checkpoint under"),
    (["--check-every", "-1"], "--check-every must be 0 (never) or a positive number of steps, got -1"),
], ids=["world", "layers", "heads", "batch", "microbatches", "resnet-tp", "steps", "no-checkpoint", "check-every"])
def test_bad_settings_are_clear_errors_before_any_rank_starts(argv, message, tmp_path, capsys):
    assert message in _error([*argv, "--out", str(tmp_path)], capsys)


@pytest.mark.parametrize("argv,message", [
    (["--pp", "1", "--tp", "2", "--steps", "5"], ("holds the shards of a dp 2 × pp 2 × tp 1 grid; this run is "
                                                   "dp 1 × pp 1 × tp 2: resume with --pp 2 --tp 1")),
    ([*GRID, "--model", "resnet50", "--steps", "5"], "is of another model: 'gpt', this run's is 'resnet50'"),
    ([*GRID, "--optimizer", "adam", "--steps", "5"], "is of another optimizer: 'sgd', this run's is 'adam'"),
    ([*GRID, "--optimizer", "sgd", "--steps", "3"], "is at step 3 already: pass --steps greater than 3"),
], ids=["grid", "model", "optimizer", "steps"])
def test_a_checkpoint_of_another_grid_or_model_is_refused(three_steps, argv, message, capsys):
    assert message in _error([*argv, "--out", str(three_steps), "--resume"], capsys)


def test_a_fresh_run_does_not_overwrite_a_checkpoint(three_steps, capsys):
    assert "holds a checkpoint at step 3 already: pass --resume" in _error(
        [*GRID, "--out", str(three_steps)], capsys)


def test_an_incomplete_checkpoint_fails_the_ranks_that_miss_their_shard_without_a_hang(three_steps, tmp_path):
    # Stage 1's ranks raise; stage 0's have started training and wait for them in the pipeline.
    out = tmp_path / "incomplete"
    shutil.copytree(three_steps, out)
    (out / "step-0000003" / "pp1-tp0.pt").unlink()
    with pytest.raises(RankError, match="lacks .*pp1-tp0.pt: the folder is incomplete") as info:
        train.main([*SGD, *GRID, "--steps", "5", "--out", str(out), "--resume", "--timeout", "60"])
    assert info.value.rank in (2, 3)  # stage 1: pp is the outermost axis


def test_torchrun_standalone_runs_the_same_cli(tmp_path):
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node=4", "-m", "nanopar.train", *SGD,
           "--pp", "2", "--tp", "2", "--steps", "2", "--eval-every", "1", "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 2/2: train loss" in proc.stdout
    assert "trained gpt steps 1-2 on dp 1 × pp 2 × tp 2 = 4 ranks" in proc.stdout
    manifest, files = shards(tmp_path)
    assert manifest["step"] == 2 and sorted(files) == ["pp0-tp0.pt", "pp0-tp1.pt", "pp1-tp0.pt", "pp1-tp1.pt"]
    # Bad input under torchrun: every rank says why and exits; nothing waits for a timeout.
    proc = subprocess.run([*cmd[:-2], "--out", str(tmp_path / "none"), "--resume"],
                          capture_output=True, text=True, timeout=240, env=env, check=False)
    assert proc.returncode != 0 and "there is no checkpoint under" in proc.stderr
