"""Model split in one process (chapters 3.2 and 4.2): the stages compose to the unsplit model."""
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nanopar import models
from nanopar.devices import stage_devices
from nanopar.model_split import (PipelinedSplitModel, SplitModel, article_split, as_blocks, even_split_points,
                                 input_misfit, resnet50_blocks, split, split_points)
from nanopar.training import make_classification_data, seeded

MLP = functools.partial(seeded, functools.partial(models.mlp, 16, 6, in_features=12, out_features=5))
RESNET = functools.partial(seeded, functools.partial(models.small_resnet, 5))
CPU = torch.device("cpu")


def grads(named_params):
    return {n: p.grad for n, p in named_params}


def assert_dicts_close(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("build, shape, boundaries", [
    (MLP, (12,), [4]),
    (MLP, (12,), [2, 5, 8]),
    (RESNET, (3, 16, 16), ["layer1", "layer3"]),       # a ResNet-like sequence of blocks, with BatchNorm
    (RESNET, (3, 16, 16), [1, 2, 3, 4, 5, 6, 7, 8, 9]),  # every block its own stage
])
def test_split_forward_and_gradients_equal_the_unsplit_model(build, shape, boundaries):
    x, y = make_classification_data(6, shape, 5)
    whole = build()
    F.cross_entropy(whole(x), y).backward()
    stages = split(build(), boundaries)
    model = SplitModel(stages, [CPU] * len(stages))
    out = model(x)
    torch.testing.assert_close(out, whole(x))
    F.cross_entropy(out, y).backward()
    assert_dicts_close(grads(model.unsplit_named_parameters()), grads(whole.named_parameters()))


def test_one_sgd_step_over_all_stages_equals_the_unsplit_step():
    x, y = make_classification_data(8, (12,), 5)
    whole, model = MLP(), SplitModel(split(MLP(), [3, 7]), [CPU] * 3)
    for m in (whole, model):
        opt = torch.optim.SGD(m.parameters(), lr=0.5)  # one optimizer over every stage's parameters
        F.cross_entropy(m(x), y).backward()
        opt.step()
    assert_dicts_close(dict(model.unsplit_named_parameters()), dict(whole.named_parameters()))


def test_article_split_is_conv1_to_layer1_then_layer2_to_fc():
    torch.manual_seed(0)
    model = models.resnet50(10).eval()  # eval: the comparison below does not move BatchNorm statistics
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    split_model = article_split(model, gpus=0)
    names = [[n for n, _ in stage.named_children()] for stage in split_model.stages]
    assert names == [["conv1", "bn1", "relu", "maxpool", "layer1"],
                     ["layer2", "layer3", "layer4", "avgpool", "flatten", "fc"]]
    assert split_model.note.startswith("fallback: 2 stages asked for, 0 GPU(s) visible")
    torch.testing.assert_close(split_model(x), expected)
    assert "stage 1 on cpu: layer2" in split_model.describe()


def test_resnet50_blocks_run_in_order_to_the_same_output_in_training_mode():
    torch.manual_seed(0)
    model = models.resnet50(10)
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    blocks = resnet50_blocks(model)
    assert [n for n, _ in blocks][-3:] == ["avgpool", "flatten", "fc"]
    torch.testing.assert_close(SplitModel(split(blocks, ["layer3"]), [CPU, CPU])(x), expected)


@pytest.mark.parametrize("split_size", [1, 3, 4, 10, 50])  # 3 and 4 leave a smaller last micro-batch
def test_pipelined_split_model_equals_the_unsplit_model(split_size):
    x, y = make_classification_data(10, (12,), 5)
    whole = MLP()
    F.cross_entropy(whole(x), y).backward()
    model = PipelinedSplitModel(split(MLP(), [2, 4, 8]), [CPU] * 4, split_size=split_size)
    out = model(x)
    torch.testing.assert_close(out, whole(x))
    F.cross_entropy(out, y).backward()
    assert_dicts_close(grads(model.unsplit_named_parameters()), grads(whole.named_parameters()))


def test_pipelined_resnet_equals_unsplit_in_eval_mode():
    # In training mode BatchNorm would normalise each micro-batch by its own statistics.
    x = torch.randn(8, 3, 16, 16)
    whole = RESNET().eval()
    model = PipelinedSplitModel(split(RESNET().eval(), ["layer2"]), [CPU, CPU], split_size=3)
    torch.testing.assert_close(model(x), whole(x))
    torch.testing.assert_close(article_split(RESNET().eval(), gpus=0, split_size=2)(x), whole(x))


def test_block_helpers():
    seq = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    assert [n for n, _ in as_blocks(seq)] == ["0", "1"]
    assert [n for n, _ in as_blocks(list(seq))] == ["0", "1"]
    assert [n for n, _ in as_blocks([("a", seq[0]), ("b", seq[1])])] == ["a", "b"]
    assert even_split_points(11, 2) == [6] and even_split_points(8, 4) == [2, 4, 6]
    assert split_points(["layer2"], resnet50_blocks(RESNET())) == [5]


# --- bad input: a clear error that says what to change ------------------------------------

@pytest.mark.parametrize("boundaries, message", [
    ([0], r"split point 0 is out of range: each must be a block index from 1 to 10"),
    ([11], r"split point 11 is out of range"),
    ([-1], r"out of range"),
    ([5, 3], r"must be strictly increasing .* sort them"),
    ([4, 4], r"strictly increasing .*drop repeats"),
    (["layer9"], r"'layer9' is not a block name; the blocks are \['0', '1'"),
    (list(range(1, 12)), r"12 stages asked for but the model has only 11 blocks.*use at most 11 stages"),
])
def test_bad_split_points(boundaries, message):
    with pytest.raises(ValueError, match=message):
        split(MLP(), boundaries)


def test_fewer_devices_than_stages():
    with pytest.raises(ValueError, match=r"3 stages need 3 devices, got 2 .*stage_devices\(3\)"):
        split(MLP(), [2, 4], [CPU, CPU])
    with pytest.raises(ValueError, match="3 stages need 3 GPUs but 0 visible; pass allow_fallback=True"):
        stage_devices(3, gpus=0, allow_fallback=False)
    if torch.cuda.device_count() < 3:
        with pytest.raises(ValueError, match="allow_fallback=True"):
            SplitModel(split(MLP(), [2, 4]), allow_fallback=False)
    with pytest.raises(ValueError, match="2 stages need 2 GPUs but 0 visible"):
        article_split(RESNET(), gpus=0, allow_fallback=False)


def test_mismatched_activation_shapes_between_stages():
    blocks = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(6, 5))
    model = SplitModel(split(blocks, [2]), [CPU, CPU])
    with pytest.raises(ValueError, match=r"stage 1 \(blocks 2\) cannot take stage 0's output, an activation of "
                                         r"shape \(4, 8\).*check the split points"):
        model(torch.randn(4, 12))
    with pytest.raises(ValueError, match=r"stage 0 \(blocks 0, 1\) cannot take the model's input"):
        model(torch.randn(4, 7))


class ViewBug(nn.Module):
    """A block with a bug of its own: its input fits, its reshape does not."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x).view(-1, 3)


def test_an_error_inside_a_stage_is_not_blamed_on_the_split():
    model = SplitModel(split(nn.Sequential(nn.Linear(12, 8), ViewBug()), [1]), [CPU, CPU])
    with pytest.raises(RuntimeError, match=r"shape '\[-1, 3\]' is invalid for input of size 32") as info:
        model(torch.randn(4, 12))
    assert info.type is RuntimeError  # the block's own error, unchanged


@pytest.mark.parametrize("stage, shape, misfit", [
    (nn.Sequential(nn.Linear(6, 5)), (8, 8), "its first Linear layer takes 6 features"),
    (nn.Sequential(nn.Linear(6, 5)), (8, 3, 6), None),                       # any leading dimensions
    (nn.Sequential(nn.ReLU(), nn.Dropout(), nn.Linear(6, 5)), (8, 7), "takes 6 features"),  # looked through
    (nn.Sequential(nn.Conv2d(3, 4, 3)), (2, 5, 8, 8), "first convolution takes 3 channels in 4 dimensions"),
    (nn.Sequential(nn.Conv2d(3, 4, 3)), (2, 3, 8, 8), None),
    (nn.Sequential(nn.Conv2d(3, 4, 3)), (3, 8, 8), None),                     # unbatched
    (nn.Sequential(nn.Conv2d(3, 4, 3)), (2, 3, 8), "in 4 dimensions"),
    (nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)), (2, 3, 8, 8), "normalisation takes 4 channels"),
    (nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 2)), (2, 7), "LayerNorm normalises the last dimensions (6,)"),
    (nn.Sequential(nn.Flatten(), nn.Linear(6, 5)), (8, 2, 3), None),          # reshaped first: cannot tell
    (nn.Sequential(nn.LazyLinear(5)), (8, 7), None),
    (models.small_resnet(5).layer2, (2, 64, 8, 8), None),                      # a block: its conv1 comes first
    (models.small_resnet(5).layer2, (2, 32, 8, 8), "takes 64 channels"),
])
def test_input_misfit_compares_shapes_with_the_first_layers(stage, shape, misfit):
    got = input_misfit(stage, shape)
    assert got is None if misfit is None else misfit in got


def test_other_bad_input():
    with pytest.raises(ValueError, match="split_size must be a positive number"):
        PipelinedSplitModel(split(MLP(), [2]), [CPU, CPU], split_size=0)
    with pytest.raises(TypeError, match="not a torchvision ResNet"):
        resnet50_blocks(nn.Linear(2, 2))
