"""MAS at scale (``docs/distributed.md``).

groups      DDP/DataParallel unwrapping, process groups, the all-reduce of pass statistics
fsdp        FSDP2 and DTensor helpers (shards, gathering, re-sharding)
sharded     the importance pass on FSDP2 models (imports the engine; import it directly)
penalty     the penalty on FSDP2 shards
checkpoint  atomic per-rank checkpoints of resumable passes
memory      what MAS keeps per parameter and device
"""

from .checkpoint import load_checkpoint, rank_path, save_atomic
from .fsdp import is_dtensor, reshard, shard_like, shard_of
from .groups import SYNC_BUCKET_BYTES, resolve_group, sync_statistics, unwrap
from .memory import MemoryReport, memory_report

__all__ = [
    "SYNC_BUCKET_BYTES",
    "MemoryReport",
    "is_dtensor",
    "load_checkpoint",
    "memory_report",
    "rank_path",
    "reshard",
    "resolve_group",
    "save_atomic",
    "shard_like",
    "shard_of",
    "sync_statistics",
    "unwrap",
]
