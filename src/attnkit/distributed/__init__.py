"""Sequence (context) parallelism over ``torch.distributed``: :func:`ring_attention` and the layouts that shard a
sequence over ranks. Gloo (CPU) is tested; NCCL is not (see README, "Beyond one machine")."""

from attnkit.distributed.layout import LAYOUTS, segments, shard, unshard
from attnkit.distributed.ring import reset_traffic, ring_attention, traffic

__all__ = ["ring_attention", "shard", "unshard", "segments", "LAYOUTS", "traffic", "reset_traffic"]
