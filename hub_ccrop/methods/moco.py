"""MoCo v1 / v2 (He et al. 2020; Chen et al. 2020): momentum key encoder, queue of negatives, InfoNCE."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hub_ccrop.distributed import (
    CPUSyncBatchNorm,
    all_gather_no_grad,
    batch_shuffle,
    batch_unshuffle,
    get_world_size,
)
from hub_ccrop.methods.base import (
    Encoder,
    MethodOptions,
    MomentumMethod,
    MomentumSchedule,
    mlp_head,
    two_crops,
)
from hub_ccrop.methods.losses import info_nce_loss, mean_cosine
from hub_ccrop.models import feature_dim
from hub_ccrop.views.batch import Views

__all__ = ["MoCo", "MoCoConfig", "MoCoV1Config", "MoCoV2Config", "SplitBatchNorm2d", "convert_split_bn"]


@dataclasses.dataclass
class MoCoConfig(MethodOptions):
    """MoCo options; the defaults are MoCo v2's (T = 0.2, MLP head 512-512-128, momentum 0.999)."""

    temperature: float = 0.2
    mlp_head: bool = True  # v2: Linear-ReLU-Linear; v1: one Linear
    hidden_dim: int | None = None  # MLP head hidden width; None: the backbone's feature width
    out_dim: int = 128
    momentum: float = 0.999
    momentum_schedule: MomentumSchedule = "constant"
    queue_size: int = 65536
    # Shuffle-BN: key-encoder BatchNorm statistics over a random slice of the global batch. Active only
    # with several processes and when the key encoder has no SyncBatchNorm (SyncBN replaces it).
    shuffle_bn: bool = True
    # Split-BN for single-process runs, where shuffle-BN has nothing to shuffle across: BatchNorm2d statistics
    # over split_bn groups of the batch, keys shuffled before the split (MoCo's own single-GPU CIFAR demo,
    # bn_splits=8). Without it the query and key of an image share BN statistics, a shortcut the model can
    # use. 1 disables it; inactive with several processes (shuffle-BN or SyncBN there).
    split_bn: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.split_bn < 1:
            raise ValueError(f"option 'split_bn' must be >= 1 (1 disables split-BN), got {self.split_bn}")


@dataclasses.dataclass
class MoCoV1Config(MoCoConfig):
    """MoCo v1: T = 0.07, linear head."""

    temperature: float = 0.07
    mlp_head: bool = False


@dataclasses.dataclass
class MoCoV2Config(MoCoConfig):
    """MoCo v2: T = 0.2, MLP head."""


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, in training and in a single process, normalizes ``num_splits`` groups of the batch
    (rows ``g, g + G, g + 2G, ...``) with their own statistics; the running statistics are the mean of the
    groups' updates. Evaluation and multi-process training: plain BatchNorm2d (the same state dict keys)."""

    def __init__(self, num_features: int, num_splits: int, **kwargs: Any) -> None:
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x: Tensor) -> Tensor:
        groups = self.num_splits
        if not self.training or groups == 1 or get_world_size() > 1:
            return super().forward(x)
        n, c, h, w = x.shape
        if n % groups:
            raise ValueError(f"MoCo split-BN: the per-process batch ({n}) must be a multiple of "
                             f"method.options.split_bn ({groups}); change the batch or split_bn")
        running_mean, running_var = self.running_mean.repeat(groups), self.running_var.repeat(groups)
        out = F.batch_norm(x.reshape(n // groups, c * groups, h, w), running_mean, running_var,
                           self.weight.repeat(groups), self.bias.repeat(groups), True, self.momentum, self.eps)
        self.running_mean.copy_(running_mean.view(groups, c).mean(0))
        self.running_var.copy_(running_var.view(groups, c).mean(0))
        self.num_batches_tracked.add_(1)
        return out.reshape(n, c, h, w)


def convert_split_bn(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``module`` by a :class:`SplitBatchNorm2d` with the same state."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            split = SplitBatchNorm2d(child.num_features, num_splits, eps=child.eps, momentum=child.momentum,
                                     affine=child.affine, track_running_stats=child.track_running_stats)
            split.load_state_dict(child.state_dict())
            setattr(module, name, split.to(child.weight.device))
        else:
            convert_split_bn(child, num_splits)
    return module


class MoCo(MomentumMethod):
    """Query encoder ``online`` (trained), key encoder ``target`` (momentum copy), and a queue of past keys.

    The loss is asymmetric as in the original: queries from ``view1``, keys from ``view2``. After each
    forward the keys of the global batch (all processes, in rank order) replace the oldest queue entries,
    so the queue is identical on every process; DDP is told not to broadcast it.
    """

    config: MoCoConfig

    def __init__(self, backbone: nn.Module, config: MoCoConfig | None = None) -> None:
        config = config or MoCoV2Config()
        dim = feature_dim(backbone)
        dims = (dim, config.hidden_dim or dim, config.out_dim) if config.mlp_head else (dim, config.out_dim)
        if config.split_bn > 1:
            backbone = convert_split_bn(backbone, config.split_bn)
        super().__init__(Encoder(backbone, mlp_head(dims)), config)
        # A fixed generator: the initial queue is the same on every process without any broadcast.
        generator = torch.Generator().manual_seed(0)
        queue = F.normalize(torch.randn(config.queue_size, config.out_dim, generator=generator), dim=1)
        self.register_buffer("queue", queue)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        # Read by DistributedDataParallel when this module is the one it wraps: the queue is consistent
        # across processes by construction, so skip its per-step broadcast (32 MB at the default size).
        self._ddp_params_and_buffers_to_ignore = ["queue", "queue_ptr"]

    def check_dataset_size(self, num_rows: int) -> bool:
        """Warn (and return False) when the queue is longer than the training set: it then holds several
        keys of the same image, including older keys of each query's own image, as negatives."""
        if self.config.queue_size > num_rows:
            warnings.warn(
                f"MoCo queue_size={self.config.queue_size} is larger than the dataset ({num_rows} rows): the "
                "queue will hold older keys of the query's own image as negatives; consider a queue_size "
                f"<= {num_rows}",
                UserWarning,
                stacklevel=2,
            )
            return False
        return True

    def forward(self, views: Views) -> tuple[Tensor, dict[str, Tensor]]:
        view1, view2 = two_crops(views, "MoCo")
        q = self.online(view1)
        with torch.no_grad():
            k = self._keys(view2)
        # The loss keeps the queue for backward: use a snapshot, then update the queue in place.
        loss = info_nce_loss(q, k, self.queue.clone(), self.config.temperature)
        self._enqueue(k)
        return loss, self._logs(loss=loss, pos_cosine=mean_cosine(q, k))

    @torch.no_grad()
    def _keys(self, x: Tensor) -> Tensor:
        shuffle = (
            self.config.shuffle_bn
            and get_world_size() > 1
            and not any(isinstance(m, nn.SyncBatchNorm | CPUSyncBatchNorm) for m in self.target.modules())
        )
        if shuffle:
            x, idx_unshuffle = batch_shuffle(x)
        elif self.config.split_bn > 1 and get_world_size() == 1:  # split-BN: keys in other groups than queries
            perm = torch.randperm(x.shape[0], device=x.device)
            return F.normalize(self.target(x[perm]).float(), dim=1)[torch.argsort(perm)]
        k = self.target(x)
        if shuffle:
            k = batch_unshuffle(k, idx_unshuffle)
        return F.normalize(k.float(), dim=1)

    @torch.no_grad()
    def _enqueue(self, keys: Tensor) -> None:
        """Replace the oldest entries by the global batch's keys (ring buffer, wraps around)."""
        keys = all_gather_no_grad(keys)
        n, size = keys.shape[0], self.queue.shape[0]
        if n > size:
            raise ValueError(f"MoCo queue_size={size} is smaller than the global batch ({n} keys)")
        idx = (self.queue_ptr + torch.arange(n, device=keys.device)) % size
        self.queue.index_copy_(0, idx, keys.to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + n) % size)
