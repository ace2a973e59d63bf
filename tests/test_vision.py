"""Chapter 5.2: ResNet50 by image size: activations grow with the pixels, gradients do not."""
import pytest

from nanopar import plotting
from nanopar.bench import vision
from nanopar.models import resnet50


def test_image_size_sweep_measures_what_grows_with_pixels(tmp_path):
    records = vision.image_size_sweep(sizes=(32, 64), batch=2, rounds=1)
    small, large = records
    params = sum(p.numel() for p in resnet50(10).parameters())
    assert small["gradient_bytes"] == large["gradient_bytes"] == 4 * params
    # Four times the pixels: about four times the activations (the stem's fixed layers make it a bit less).
    assert 3 < large["activation_bytes"] / small["activation_bytes"] < 4.5
    assert all(0 < r["comm_share"] < 1 and r["compute_s"] > 0 for r in records)
    plotting.plot_image_sizes(records, path=str(tmp_path / "sizes.png"))
    assert (tmp_path / "sizes.png").stat().st_size > 10_000


@pytest.mark.parametrize("sizes", [(64, 32), (16,), (32, 32)])
def test_sizes_must_increase_from_32(sizes):
    with pytest.raises(ValueError, match="increasing image sizes of at least 32"):
        vision.image_size_sweep(sizes=sizes)


def test_a_batch_of_one_small_image_is_refused_before_batchnorm_fails():
    with pytest.raises(ValueError, match="need a batch of at least 2"):
        vision.image_size_sweep(sizes=(32,), batch=1)
