"""Small models that the book's chapters train, split and shard.

Chapter 1 measures the cost of training with :func:`mlp`; chapters 3 and 4 split the
same ``nn.Sequential`` into stages. :func:`gpt` is the small language model of chapters
3.3, 4 and 5.1, cut into pipeline stages and sharded for tensor parallelism. Other
chapters add their models here (a ResNet, embedding tables), so that notebooks and tests
share one definition.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
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


# ---------------------------------------------------------------------------------------
# A small GPT (chapters 3.3, 4 and 5.1): a decoder-only transformer in the style of nanoGPT,
# built as an nn.Sequential of named blocks so that it cuts into pipeline stages at block
# boundaries and its blocks shard for tensor parallelism (nanopar.tensor_parallel).


@dataclass
class GPTConfig:
    """The shape of a :func:`gpt` (chapter 5.1): vocabulary, context length, depth, heads, width.

    No dropout, so that parallel runs compare exactly with one process. ``tiny()`` trains
    in seconds on a CPU; ``gpt_100m()`` (about 100 M parameters) is a GPU reader's run.
    """

    vocab_size: int = 65
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    bias: bool = True

    def __post_init__(self):
        sizes = {k: getattr(self, k) for k in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")}
        bad = {k: v for k, v in sizes.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
        if bad:
            raise ValueError(f"GPTConfig sizes must be positive integers, got {bad}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} does not divide into n_head={self.n_head} heads: "
                             f"choose n_embd a multiple of n_head (e.g. {self.n_head * 16}) or a divisor "
                             f"of n_embd as n_head")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.n_embd // self.n_head

    @classmethod
    def tiny(cls, vocab_size: int = 65) -> GPTConfig:
        """Two layers, 64 wide, context 32: a training step takes milliseconds on a CPU."""
        return cls(vocab_size=vocab_size, block_size=32, n_layer=2, n_head=4, n_embd=64)

    @classmethod
    def gpt_100m(cls, vocab_size: int = 65) -> GPTConfig:
        """About 100 M parameters (14 layers of 768, 16 heads, context 256): for a GPU.

        14 layers plus the embedding and the head are 16 blocks, which cut evenly into
        2, 4, 8 or 16 pipeline stages; 16 heads shard over 2, 4, 8 or 16 tensor-parallel ranks.
        """
        return cls(vocab_size=vocab_size, block_size=256, n_layer=14, n_head=16, n_embd=768)


def _init_linear(layer: nn.Linear, std: float = 0.02) -> nn.Linear:
    # GPT-2's initialisation, as in nanoGPT: N(0, 0.02) weights, zero biases.
    nn.init.normal_(layer.weight, 0.0, std)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


class Embeddings(nn.Module):
    """Token plus learned position embedding: ids (B, T) -> activations (B, T, n_embd)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        for table in (self.wte, self.wpe):
            nn.init.normal_(table.weight, 0.0, 0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[-1]
        if t > self.wpe.num_embeddings:
            raise ValueError(f"a sequence of {t} tokens is longer than the model's block_size="
                             f"{self.wpe.num_embeddings}: crop the input to its last {self.wpe.num_embeddings} "
                             "tokens or build the model with a larger block_size")
        return self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused ``qkv`` projection and an output ``proj``.

    The rows of ``qkv.weight`` are head-major: head 0's query, key and value rows, then
    head 1's, and so on (Megatron-LM's layout; nanoGPT puts all queries first). So any
    contiguous slice of whole heads' rows is a complete smaller attention, which is what
    a column-parallel split (ours, or PyTorch's ``ColwiseParallel``) takes. The number of
    heads is read from the width of ``qkv``'s output, so a sharded layer runs its share.
    """

    def __init__(self, config: GPTConfig, residual_std: float):
        super().__init__()
        self.head_dim = config.head_dim
        self.qkv = _init_linear(nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias))
        self.proj = _init_linear(nn.Linear(config.n_embd, config.n_embd, bias=config.bias), residual_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = self.qkv(x).view(b, t, -1, 3, self.head_dim)  # (B, T, heads here, q|k|v, head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each (B, heads, T, head_dim)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """The position-wise feed-forward layer: ``fc`` to 4 × n_embd, GELU, ``proj`` back."""

    def __init__(self, config: GPTConfig, residual_std: float):
        super().__init__()
        self.fc = _init_linear(nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias))
        self.act = nn.GELU()
        self.proj = _init_linear(nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias), residual_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    """One transformer layer, pre-LayerNorm: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        # GPT-2 scales the projections into the residual stream by 1/sqrt(2 · layers).
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        self.ln1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, residual_std)
        self.ln2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config, residual_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Head(nn.Module):
    """Final LayerNorm and the projection to vocabulary logits (B, T, vocab_size)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = _init_linear(nn.Linear(config.n_embd, config.vocab_size, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(x))


def gpt(config: GPTConfig | None = None) -> nn.Sequential:
    """A GPT as named blocks ``embed``, ``h0`` … ``h{n_layer-1}``, ``head`` (chapters 3.3 and 5.1).

    Token ids (B, T) in, logits (B, T, vocab_size) out. Being an ``nn.Sequential``, it
    cuts into pipeline stages at block boundaries (``model_split.split(model, ["h1"])``)
    and its ``Block``s shard with ``tensor_parallel.parallelize_gpt``. The embedding and
    the output layer are NOT tied (GPT-2 ties them): tying would make the first and the
    last pipeline stage share a weight, and their gradients would have to be summed
    across stages every step. Build under ``training.seeded`` for identical weights.
    """
    config = GPTConfig() if config is None else config
    blocks: list[tuple[str, nn.Module]] = [("embed", Embeddings(config))]
    blocks += [(f"h{i}", Block(config)) for i in range(config.n_layer)]
    blocks.append(("head", Head(config)))
    return nn.Sequential(OrderedDict(blocks))


def gpt_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of next-token logits (B, T, V) against targets (B, T) (chapter 5.1).

    A micro-batch's loss as ``pipeline.execute`` expects (its ``loss_fn``).
    """
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten())


@torch.no_grad()
def generate(model: nn.Module, idx: torch.Tensor, new_tokens: int, temperature: float = 1.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample ``new_tokens`` tokens after the ids ``idx`` (B, T); return (B, T + new_tokens) (chapter 5.1).

    The context is cropped to the model's ``block_size``. Lower ``temperature`` is more
    conservative; a seeded ``generator`` makes the sample reproducible.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r} (use a small value such as 0.01 "
                         "for nearly greedy sampling)")
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 0:
        raise ValueError(f"new_tokens must be a whole number >= 0, got {new_tokens!r}")
    embeddings = [m for m in model.modules() if isinstance(m, Embeddings)]
    if not embeddings:
        raise TypeError("generate needs a whole GPT (an Embeddings block first), e.g. models.gpt(config)")
    block_size = embeddings[0].wpe.num_embeddings
    for _ in range(new_tokens):
        logits = model(idx[:, -block_size:])[:, -1, :] / temperature
        probs = F.softmax(logits, dim=-1)
        idx = torch.cat([idx, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return idx
