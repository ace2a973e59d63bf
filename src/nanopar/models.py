"""Small models that the book's chapters train, split and shard.

Chapter 1 measures the cost of training with :func:`mlp`; chapters 3 and 4 split the
same ``nn.Sequential`` into stages. Other chapters add their models here (a small GPT,
a ResNet, embedding tables), so that notebooks and tests share one definition.
"""
from __future__ import annotations

from torch import nn


def mlp(
    width: int,
    depth: int,
    in_features: int | None = None,
    out_features: int | None = None,
) -> nn.Sequential:
    """A multi-layer perceptron of ``depth`` Linear layers with ReLU between them (chapter 1).

    Every hidden layer is ``width`` wide; the input and output default to ``width`` too,
    so all layers are alike and the model splits evenly into stages (chapters 3 and 4).
    The result is an ``nn.Sequential``: ``model[i:j]`` is a stage of layers.
    """
    n_in = width if in_features is None else in_features
    n_out = width if out_features is None else out_features
    if min(width, depth, n_in, n_out) < 1:
        raise ValueError(
            f"width, depth, in_features and out_features must be >= 1, got "
            f"width={width}, depth={depth}, in_features={n_in}, out_features={n_out}"
        )
    sizes = [n_in] + [width] * (depth - 1) + [n_out]
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


def resnet50(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet50, the article's model (chapter 4). Needs ``torchvision``.

    Unchanged from torchvision: it takes 224×224 images as in the article, and any size
    from 32×32 up (on CPU the book uses small images; the layers are the same).
    """
    from torchvision.models import resnet50 as tv_resnet50

    return tv_resnet50(num_classes=num_classes)


def small_resnet(num_classes: int = 10, blocks: tuple[int, int, int, int] = (1, 1, 1, 1)) -> nn.Module:
    """A ResNet with BatchNorm, small enough for tests on CPU (chapters 3.1 and 4.1).

    torchvision's ResNet with basic blocks; ``(2, 2, 2, 2)`` is ResNet18.
    """
    from torchvision.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, list(blocks), num_classes=num_classes)
