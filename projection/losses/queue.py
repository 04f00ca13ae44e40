"""InfoNCE against a MoCo memory queue (He et al. 2020): the pair loss for small batches.

Its own module because the queue is state (buffers saved in ``state_dict``) rather than a formula;
registered in ``projection.losses.registry`` as ``queue_infonce`` with the other losses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from projection.losses.geometry import check_pair


class MemoryQueue(nn.Module):
    """FIFO of the last K key embeddings (MoCo, He et al. 2020), used as extra negatives.

    When: batches are small (big models, few GPUs) so in-batch negatives are too few; the
    queue supplies K >> N negatives from recent steps at no extra encoder cost. Keys are
    stored detached (no gradient through old steps). Buffers move with `.to()` and are
    saved in `state_dict`. Any batch size works: writes wrap around modulo K (MoCo needs
    K % N == 0; this does not). A batch larger than K keeps only its last K rows.
    """

    def __init__(self, queue_size: int, dim: int):
        super().__init__()
        if queue_size < 1 or dim < 1:
            raise ValueError(f"queue_size and dim must be >= 1, got {queue_size} and {dim}")
        self.queue_size = int(queue_size)
        self.dim = int(dim)
        self.register_buffer("queue", torch.zeros(self.queue_size, self.dim))  # (K, D)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # next slot to write
        self.register_buffer("num_filled", torch.zeros((), dtype=torch.long))  # valid rows, <= K

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write keys (B, D) at ptr, ptr+1, ... (mod K), overwriting the oldest entries."""
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must have shape (B, {self.dim}), got {tuple(keys.shape)}")
        keys = keys.detach()[-self.queue_size :].to(self.queue.dtype)  # (B', D), B' <= K
        b = keys.shape[0]
        idx = (self.ptr + torch.arange(b, device=self.queue.device)) % self.queue_size  # (B',)
        self.queue[idx] = keys.to(self.queue.device)
        self.ptr.copy_((self.ptr + b) % self.queue_size)
        self.num_filled.copy_(torch.clamp(self.num_filled + b, max=self.queue_size))

    def negatives(self) -> torch.Tensor:
        """A copy of the valid keys (M, D), M = min(#enqueued, K) (rows [0, M) until the first wrap).

        A copy, not a view: a loss built on it must survive a later in-place `enqueue`
        before `backward()` (autograd would otherwise fail with a version-counter error).
        """
        return self.queue[: int(self.num_filled)].clone()

    def __len__(self) -> int:
        return int(self.num_filled)


class QueueInfoNCELoss(nn.Module):
    """InfoNCE against a MoCo memory queue of past keys (He et al. 2020).

    When: small batches. Each query's only positive is its own key; its negatives are the
    M <= K queued keys from earlier steps (no in-batch negatives, as in MoCo). Query and key
    are L2-normalised; with q = norm(query_i), k = norm(key_i), Q the queue (M, D):

        logits_i = [q . k, q . Q_1, ..., q . Q_M] / T          (1 + M,)
        loss = 1/N sum_i -log softmax(logits_i)_0
        then enqueue(k)   (only in training mode, so evaluation does not pollute the queue)

    On the very first step the queue is empty and the loss is exactly 0. Gradients flow
    into both query and key through q . k; in MoCo the key comes from a momentum encoder
    under `torch.no_grad()`, which the caller controls.
    """

    def __init__(self, temperature: float = 0.07, queue_size: int = 4096, dim: int | None = None):
        super().__init__()
        if dim is None:
            raise TypeError("QueueInfoNCELoss needs `dim`, the embedding size of the queued keys")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.queue = MemoryQueue(queue_size, dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        check_pair(query, key, ("query", "key"))
        q = F.normalize(query, dim=-1)  # (N, D)
        k = F.normalize(key, dim=-1)  # (N, D)
        negatives = self.queue.negatives().to(q.dtype)  # (M, D), snapshot before this step's keys
        l_pos = (q * k).sum(-1, keepdim=True)  # (N, 1)
        l_neg = q @ negatives.T  # (N, M)
        logits = torch.cat([l_pos, l_neg], dim=1) / self.temperature  # (N, 1 + M)
        targets = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)  # positive is column 0
        loss = F.cross_entropy(logits, targets)
        if self.training:
            self.queue.enqueue(k)
        return loss
