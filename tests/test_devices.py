"""nanopar.devices and backend choice, with the GPU count faked."""
import pytest
import torch

from nanopar import devices
from nanopar.launch import rank_device, resolve_backend
from nanopar.torchrun import torchrun_backend


@pytest.mark.parametrize("gpus, tier", [(0, "cpu"), (1, "one-gpu"), (2, "multi-gpu"), (8, "multi-gpu")])
def test_tier(gpus, tier):
    assert devices.detect_tier(gpus) == tier
    assert devices.describe(gpus).startswith(f"tier: {tier}")


def test_a_faked_gpu_count_names_no_devices(monkeypatch):
    # On a machine with one GPU, asking about eight must not look up devices 1 to 7.
    monkeypatch.setattr(devices, "gpu_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: ["the GPU"][i])
    assert devices.describe(8).endswith("8 GPU(s)")
    assert devices.describe().endswith("1 GPU(s) (the GPU)")


def test_negative_gpu_count_is_an_error():
    with pytest.raises(ValueError, match="gpu count must be >= 0, got -1"):
        devices.detect_tier(-1)


def test_two_stages_on_two_gpus_use_cuda0_and_cuda1():
    p = devices.stage_devices(2, gpus=2)
    assert p.devices == (torch.device("cuda", 0), torch.device("cuda", 1)) and not p.fallback


@pytest.mark.parametrize("gpus, expected", [(0, "cpu"), (1, "cuda:0")])
def test_fewer_devices_than_stages_falls_back_and_says_so(gpus, expected):
    p = devices.stage_devices(4, gpus=gpus)
    assert p.fallback and {str(d) for d in p.devices} == {expected}
    assert "fallback" in p.note and f"{gpus} GPU(s) visible" in p.note


def test_fallback_can_be_refused():
    with pytest.raises(ValueError, match="2 stages need 2 GPUs but 1 visible"):
        devices.stage_devices(2, gpus=1, allow_fallback=False)
    with pytest.raises(ValueError, match="need at least one stage, got 0"):
        devices.stage_devices(0)


def test_auto_backend():
    assert resolve_backend("auto", 4, gpus=0) == "gloo"
    assert resolve_backend("auto", 4, gpus=2) == "gloo"  # not one GPU per rank
    if torch.distributed.is_nccl_available():
        assert resolve_backend("auto", 2, gpus=2) == "nccl"
    assert rank_device("nccl", 1) == torch.device("cuda", 1)
    assert rank_device("gloo", 1) == torch.device("cpu")


def test_bad_backend_requests():
    with pytest.raises(ValueError, match="3 ranks asked for, 2 GPU"):
        resolve_backend("nccl", 3, gpus=2)
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend("mpi", 2, gpus=0)


@pytest.mark.parametrize("local_rank", ["0", "1"])
def test_torchrun_backend_is_the_same_on_every_rank_of_a_machine(local_rank):
    env = {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": local_rank}
    assert torchrun_backend("auto", env, gpus=1) == "gloo"  # two ranks cannot share one GPU under NCCL
    assert torchrun_backend("auto", env, gpus=2) == ("nccl" if torch.distributed.is_nccl_available() else "gloo")
    assert torchrun_backend("gloo", env, gpus=2) == "gloo"
    with pytest.raises(ValueError, match="2 ranks asked for, 1 GPU"):
        torchrun_backend("nccl", env, gpus=1)


def test_info_names_tier_versions_and_backends(monkeypatch):
    monkeypatch.setattr(devices, "gpu_count", lambda: 0)
    info = devices.info()
    assert (info["tier"], info["gpus"]) == ("cpu", [])
    assert info["torch"] == torch.__version__
    assert info["backends"] == {"gloo": True, "nccl": False}
