"""BatchNorm with statistics over the whole global batch, on CPU ranks too (chapter 4.1).

With data parallelism each rank normalises by the mean and variance of *its own*
shard: that is what DDP does by default, and it makes the N-rank run differ from one
process on the whole batch (chapter 3.1). Synchronised BatchNorm all-reduces the sums
instead, so every rank normalises with the global statistics. PyTorch's
``nn.SyncBatchNorm`` does this on GPUs only (on CPU tensors it raises "SyncBatchNorm
layers only work with GPU modules"); :class:`SyncBatchNorm` here is the same idea in
a few lines, differentiable through ``nanopar.comm.all_reduce_with_grad``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .comm import all_reduce_with_grad


class SyncBatchNorm(_BatchNorm):
    """BatchNorm over the global batch of all ranks in ``group``, for any device."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
                 track_running_stats: bool = True, group=None):
        if momentum is None:
            raise ValueError("momentum=None (a cumulative average) is not supported; pass a number like 0.1")
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.group = group

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (batch, channels, …), got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training or not dist.is_initialized() or dist.get_world_size(self.group) == 1:
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        # Two passes (mean, then the mean of squared deviations) match one process's
        # BatchNorm to float rounding; E[x²] − E[x]² would lose digits.
        sums = all_reduce_with_grad(torch.cat([x.sum(dims), count]), group=self.group)
        total = sums[-1]
        if total.item() <= 1:  # the same on every rank: the count was summed over the group
            raise ValueError(
                f"Expected more than 1 value per channel when training: the global batch over "
                f"{dist.get_world_size(self.group)} ranks has {total.item():g} (input size {list(x.shape)} "
                "on this rank). Use a larger batch, or eval() mode.")
        mean = sums[:-1] / total
        centred = x - mean.view(shape)
        var = all_reduce_with_grad(centred.square().sum(dims), group=self.group) / total
        if self.track_running_stats:
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(var.detach() * total / (total - 1), self.momentum)
                self.num_batches_tracked += 1
        y = centred / torch.sqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def convert_sync_batchnorm(module: nn.Module, group=None) -> nn.Module:
    """Replace every BatchNorm layer by a synchronised one: PyTorch's on GPUs, ours elsewhere (chapter 3.1).

    The new layers keep the old ones' Parameter and buffer objects (an optimizer built
    before the conversion still updates them), their training flag, dtype and device.
    """
    on_gpu = any(p.is_cuda for p in module.parameters())
    if on_gpu:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, group)
    return _convert(module, group)


def _convert(module: nn.Module, group) -> nn.Module:
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        sync = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                             module.track_running_stats, group)
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            setattr(sync, name, tensor)
        return sync.train(module.training)
    for name, child in module.named_children():
        module.add_module(name, _convert(child, group))
    return module
