"""stylenorm: exact, fast normalization layers and style losses built on one statistics helper.

Example:
    >>> import torch, stylenorm
    >>> norm = stylenorm.InstanceNorm2d(8, affine=True)
    >>> norm(torch.randn(2, 8, 16, 16)).shape
    torch.Size([2, 8, 16, 16])
"""

from . import functional, reference, stats
from .convert import (
    LegacyLoadResult,
    load_legacy_state_dict,
    strip_legacy_running_stats,
    to_stylenorm,
    to_torch,
)
from .norm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
)
from .sync import SyncBatchNorm

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LegacyLoadResult",
    "SyncBatchNorm",
    "functional",
    "load_legacy_state_dict",
    "reference",
    "stats",
    "strip_legacy_running_stats",
    "to_stylenorm",
    "to_torch",
]
