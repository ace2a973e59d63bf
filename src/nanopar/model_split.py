"""Model parallelism in one process: cut a model into stages, one device per stage.

Book: chapter 3.2 (F_M∘…∘F_1 across stages equals the whole model) and chapter 4.2
(the article's two-GPU ResNet50, then pipelined).

The article's ``ModelParallelResNet50`` puts conv1…layer1 on cuda:0 and layer2…fc on
cuda:1. Here the same idea is general: a model is an ordered list of named *blocks*
(:func:`as_blocks`, :func:`resnet50_blocks`); ``boundaries`` say where each new stage
starts; :func:`split` makes one ``nn.Sequential`` per stage, on its device.

    model = models.resnet50()
    split_model = article_split(model)              # conv1…layer1 | layer2…fc
    print(split_model.note)                         # which devices, or the fallback
    out = split_model(images)                       # == model(images)

Block names are kept, so a stage's parameter names are the unsplit model's names
(``layer2.0.conv1.weight``), which lets tests compare gradients name by name.
:class:`SplitModel` is the naive split (one stage works at a time);
:class:`PipelinedSplitModel` cuts the batch into micro-batches so that on GPUs stage
k works on micro-batch i while stage k+1 works on micro-batch i−1, as in PyTorch's
model-parallel tutorial.
"""
from __future__ import annotations

import operator
from collections import OrderedDict
from typing import Iterator, Sequence, Union

import torch
from torch import nn

from . import devices as _devices

Blocks = list[tuple[str, nn.Module]]
Boundary = Union[int, str]
# The article's cut: the second GPU starts at layer2.
ARTICLE_BOUNDARY = "layer2"
_RESNET_BLOCKS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool")


def resnet50_blocks(model: nn.Module) -> Blocks:
    """torchvision's ResNet (50, or any other depth) as its ordered blocks (chapter 4.2).

    conv1, bn1, relu, maxpool, layer1 … layer4, avgpool, flatten, fc. ResNet's
    ``forward`` flattens between avgpool and fc with ``torch.flatten``, which is not a
    module, so an ``nn.Flatten`` block stands in for it.
    """
    missing = [n for n in (*_RESNET_BLOCKS, "fc") if not hasattr(model, n)]
    if missing:
        raise TypeError(f"{type(model).__name__} is not a torchvision ResNet (it lacks {missing}); give "
                        "the model as an nn.Sequential or a list of (name, module) blocks instead")
    return [(n, getattr(model, n)) for n in _RESNET_BLOCKS] + [("flatten", nn.Flatten(1)), ("fc", model.fc)]


def as_blocks(model: nn.Module | Sequence[nn.Module] | Blocks) -> Blocks:
    """Any model given as a sequence of blocks, as ``[(name, module), …]`` (chapter 3.2).

    Accepts an ``nn.Sequential`` (its children), a torchvision ResNet, a list of
    modules (named "0", "1", …) or a list of ``(name, module)`` pairs.
    """
    if isinstance(model, nn.Sequential):
        return list(model.named_children())
    if isinstance(model, nn.Module):
        return resnet50_blocks(model)
    items = list(model)
    if all(isinstance(b, nn.Module) for b in items):
        return [(str(i), b) for i, b in enumerate(items)]
    if all(isinstance(b, tuple) and len(b) == 2 and isinstance(b[1], nn.Module) for b in items):
        return [(str(n), b) for n, b in items]
    raise TypeError("blocks must be an nn.Sequential, a torchvision ResNet, a list of modules "
                    "or a list of (name, module) pairs")


def split_points(boundaries: Sequence[Boundary], blocks: Blocks) -> list[int]:
    """Check ``boundaries`` (block indices or names where stages 1, 2, … start); return indices.

    k − 1 boundaries make k stages. Each must be a block after the first, and they must
    increase, so that every stage gets at least one block.
    """
    names = [n for n, _ in blocks]
    n = len(blocks)
    if len(boundaries) + 1 > n:
        raise ValueError(f"{len(boundaries) + 1} stages asked for but the model has only {n} blocks "
                         f"({', '.join(names)}): use at most {n} stages, i.e. at most {n - 1} split points")
    points = []
    for b in boundaries:
        if isinstance(b, str):
            if b not in names:
                raise ValueError(f"split point {b!r} is not a block name; the blocks are {names}")
            b = names.index(b)
        elif not isinstance(b, bool) and hasattr(b, "__index__"):  # numpy and torch integers too
            b = operator.index(b)
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= n - 1:
            raise ValueError(f"split point {b!r} is out of range: each must be a block index from 1 to "
                             f"{n - 1} (the index where a new stage starts; the model has {n} blocks)")
        points.append(b)
    if any(a >= b for a, b in zip(points, points[1:])):
        raise ValueError(f"split points {list(boundaries)} must be strictly increasing (as indices {points}) "
                         "so that every stage gets at least one block: sort them and drop repeats")
    return points


def even_split_points(n_blocks: int, stages: int) -> list[int]:
    """Boundaries that give ``stages`` stages as equal in block count as possible."""
    if not 1 <= stages <= n_blocks:
        raise ValueError(f"cannot cut {n_blocks} blocks into {stages} stages: use 1 to {n_blocks} stages")
    return [round(i * n_blocks / stages) for i in range(1, stages)]


def stage_block_ranges(boundaries: Sequence[int], n_blocks: int) -> list[range]:
    """The block indices of each stage, e.g. ``[range(0, 5), range(5, 11)]``."""
    edges = [0, *boundaries, n_blocks]
    return [range(a, b) for a, b in zip(edges, edges[1:])]


def split(blocks: nn.Module | Blocks, boundaries: Sequence[Boundary],
          devices: Sequence[torch.device | str] | None = None) -> list[nn.Sequential]:
    """Cut ``blocks`` into stages at ``boundaries``; move stage i to ``devices[i]`` (chapter 3.2).

    The stages share their modules (and parameters) with the model they came from.
    ``devices=None`` leaves every block where it is.
    """
    blocks = as_blocks(blocks)
    points = split_points(boundaries, blocks)
    k = len(points) + 1
    if devices is not None and len(devices) != k:
        raise ValueError(f"{k} stages need {k} devices, got {len(devices)} ({[str(d) for d in devices]}); "
                         f"pass one device per stage, e.g. devices.stage_devices({k}).devices, which falls "
                         "back to one shared device when there are too few")
    stages = [nn.Sequential(OrderedDict(blocks[i] for i in r)) for r in stage_block_ranges(points, len(blocks))]
    if devices is not None:
        stages = [s.to(torch.device(d)) for s, d in zip(stages, devices)]
    return stages


def run_stage(i: int, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``stage(x)``; when it fails because ``x`` does not fit the stage, an error that says so (chapter 4.2).

    Any other error (out of memory, a bug inside a block) passes through unchanged.
    """
    try:
        return stage(x)
    except RuntimeError as e:
        misfit = input_misfit(stage, tuple(x.shape))
        if misfit is None:
            raise
        raise ValueError(shape_error(i, stage, tuple(x.shape), f"{misfit}; {e}")) from e


# Layers that keep their input's shape: the stage's input reaches the layer after them as it is.
_SHAPE_KEEPING = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU,
                  nn.Dropout, nn.Identity)


def input_misfit(stage: nn.Module, shape: tuple[int, ...]) -> str | None:
    """Why a tensor of ``shape`` cannot enter ``stage``, judged by its first layers; None if it can or if unknown.

    Layers are taken in the order they were registered, which is the order they run in
    for ``nn.Sequential`` stages and for most blocks (torchvision's, a transformer block).
    The first Linear, convolution or unknown layer ends the search; shape-keeping layers
    and normalisations (after checking their feature count) are looked through.
    """
    for m in stage.modules():
        if next(m.children(), None) is not None:
            continue  # a container: its layers follow
        if isinstance(m, nn.modules.lazy.LazyModuleMixin):
            return None  # its input size is not fixed yet
        if isinstance(m, nn.Linear):
            fits = len(shape) >= 1 and shape[-1] == m.in_features
            return None if fits else f"its first Linear layer takes {m.in_features} features in the last dimension"
        if isinstance(m, nn.modules.conv._ConvNd):
            d = len(m.kernel_size)  # (N, C, *spatial) or unbatched (C, *spatial)
            channels = shape[1] if len(shape) == d + 2 else shape[0] if len(shape) == d + 1 else None
            fits = channels == m.in_channels
            return None if fits else f"its first convolution takes {m.in_channels} channels in {d + 2} dimensions"
        if isinstance(m, nn.modules.batchnorm._NormBase):
            if len(shape) < 2 or shape[1] != m.num_features:
                return f"its first normalisation takes {m.num_features} channels in dimension 1"
        elif isinstance(m, nn.LayerNorm):
            if tuple(shape[len(shape) - len(m.normalized_shape):]) != tuple(m.normalized_shape):
                return f"its first LayerNorm normalises the last dimensions {tuple(m.normalized_shape)}"
        elif not isinstance(m, _SHAPE_KEEPING):
            return None  # a layer that may change the shape: what follows cannot be judged from here
    return None


def shape_error(i: int, stage: nn.Module, shape: tuple[int, ...], detail: str) -> str:
    """The message for a stage that cannot take the activation it was given."""
    names = ", ".join(n for n, _ in stage.named_children())
    source = "the model's input" if i == 0 else f"stage {i - 1}'s output"
    return (f"stage {i} (blocks {names}) cannot take {source}, an activation of shape {shape} ({detail}). "
            "The blocks on the two sides of this split do not fit together: check the split points and "
            "that the blocks are listed in the order the model runs them (and the input's shape)")


class SplitModel(nn.Module):
    """The naive split: stage i runs on ``devices[i]``; activations move between them (chapter 4.2).

    The generalised ``ModelParallelResNet50``: while one stage computes, the others wait.
    ``devices=None`` places the stages with ``devices.stage_devices`` (the stated
    fallback when there are fewer GPUs than stages; ``allow_fallback=False`` makes
    that an error). ``note`` says which placement was used.
    """

    def __init__(self, stages: Sequence[nn.Module], devices: Sequence[torch.device | str] | None = None,
                 allow_fallback: bool = True):
        super().__init__()
        if devices is None:
            placement = _devices.stage_devices(len(stages), allow_fallback=allow_fallback)
            devices, self.note = placement.devices, placement.note
        else:
            self.note = "stages on " + ", ".join(map(str, devices))
        if len(devices) != len(stages):
            raise ValueError(f"{len(stages)} stages need {len(stages)} devices, got {len(devices)}: "
                             "pass one device per stage (a device may repeat)")
        self.devices = [torch.device(d) for d in devices]
        self.stages = nn.ModuleList(s.to(d) for s, d in zip(stages, self.devices))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (stage, dev) in enumerate(zip(self.stages, self.devices)):
            x = run_stage(i, stage, x.to(dev))
        return x

    def unsplit_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) with the names of the unsplit model (no ``stages.i.`` prefix)."""
        for stage in self.stages:
            yield from stage.named_parameters()

    def describe(self) -> str:
        """One line per stage: its device, its blocks and its parameter count."""
        lines = []
        for i, (stage, dev) in enumerate(zip(self.stages, self.devices)):
            n = sum(p.numel() for p in stage.parameters())
            lines.append(f"stage {i} on {dev}: {', '.join(n for n, _ in stage.named_children())} ({n:,} parameters)")
        return "\n".join(lines)


class PipelinedSplitModel(SplitModel):
    """The split model fed ``split_size`` samples at a time, so that stages overlap on GPUs (chapter 4.2).

    PyTorch's model-parallel tutorial, for k stages: at tick t, stage i runs micro-batch
    t − i. CUDA kernels are queued asynchronously, so work issued to different GPUs in
    the same tick runs at the same time; on the CPU (or one shared device) the result
    is the same and the stages simply take turns. The last micro-batch may be smaller.
    Backward runs through autograd as usual (and is not overlapped, as in the tutorial).
    With BatchNorm in training mode, statistics are per micro-batch, so outputs differ
    from the unsplit model: compare in ``eval()`` mode, or with models without it.
    """

    def __init__(self, stages: Sequence[nn.Module], devices: Sequence[torch.device | str] | None = None,
                 split_size: int = 20, allow_fallback: bool = True):
        super().__init__(stages, devices, allow_fallback)
        if isinstance(split_size, bool) or not isinstance(split_size, int) or split_size < 1:
            raise ValueError(f"split_size must be a positive number of samples, got {split_size!r}")
        self.split_size = split_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        micro = list(x.split(self.split_size, dim=0))
        k, m = len(self.stages), len(micro)
        acts: list[torch.Tensor | None] = [None] * m
        outs: list[torch.Tensor | None] = [None] * m
        for t in range(m + k - 1):
            # Later stages first: their micro-batches are older, and issuing them before the
            # next micro-batch enters stage 0 keeps every device's queue busy.
            for i in reversed(range(k)):
                j = t - i
                if 0 <= j < m:
                    inp = micro[j] if i == 0 else acts[j]
                    acts[j] = run_stage(i, self.stages[i], inp.to(self.devices[i]))
                    if i == k - 1:
                        outs[j], acts[j] = acts[j], None
        return torch.cat(outs)  # type: ignore[arg-type]


def article_split(model: nn.Module, *, gpus: int | None = None, allow_fallback: bool = True,
                  split_size: int | None = None) -> SplitModel:
    """The article's two stages: conv1…layer1 | layer2…fc, on ``stage_devices(2)`` (chapter 4.2).

    cuda:0 and cuda:1 with two GPUs; otherwise one device for both, said in ``.note``.
    With ``split_size`` it is the pipelined version.
    """
    placement = _devices.stage_devices(2, gpus=gpus, allow_fallback=allow_fallback)
    stages = split(resnet50_blocks(model), [ARTICLE_BOUNDARY])
    if split_size is None:
        out = SplitModel(stages, placement.devices)
    else:
        out = PipelinedSplitModel(stages, placement.devices, split_size=split_size)
    out.note = placement.note
    return out
