"""MoCo v1 / v2 (He et al. 2020; Chen et al. 2020): momentum key encoder, queue of negatives, InfoNCE."""

from __future__ import annotations

import dataclasses
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hub_ccrop.methods.base import Encoder, MethodConfig, MomentumMethod, MomentumSchedule, mlp_head
from hub_ccrop.methods.distributed import all_gather_no_grad, batch_shuffle, batch_unshuffle, get_world_size
from hub_ccrop.methods.losses import info_nce_loss, mean_cosine
from hub_ccrop.models import feature_dim

__all__ = ["MoCo", "MoCoConfig", "MoCoV1Config", "MoCoV2Config"]


@dataclasses.dataclass
class MoCoConfig(MethodConfig):
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
    num_rows: int | None = None  # training-set size, to warn when the queue is longer


@dataclasses.dataclass
class MoCoV1Config(MoCoConfig):
    """MoCo v1: T = 0.07, linear head."""

    temperature: float = 0.07
    mlp_head: bool = False


@dataclasses.dataclass
class MoCoV2Config(MoCoConfig):
    """MoCo v2: T = 0.2, MLP head."""


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
        super().__init__(Encoder(backbone, mlp_head(dims)), config)
        # A fixed generator: the initial queue is the same on every process without any broadcast.
        generator = torch.Generator().manual_seed(0)
        queue = F.normalize(torch.randn(config.queue_size, config.out_dim, generator=generator), dim=1)
        self.register_buffer("queue", queue)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        # Read by DistributedDataParallel when this module is the one it wraps: the queue is consistent
        # across processes by construction, so skip its per-step broadcast (32 MB at the default size).
        self._ddp_params_and_buffers_to_ignore = ["queue", "queue_ptr"]
        if config.num_rows is not None:
            self.check_dataset_size(config.num_rows)

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

    def forward(self, view1: Tensor, view2: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
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
            and not any(isinstance(m, nn.SyncBatchNorm) for m in self.target.modules())
        )
        if shuffle:
            x, idx_unshuffle = batch_shuffle(x)
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
