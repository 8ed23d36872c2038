"""stylenorm: exact, fast normalization layers and style losses built on one statistics helper.

Example:
    >>> import torch, stylenorm
    >>> norm = stylenorm.InstanceNorm2d(8, affine=True)
    >>> norm(torch.randn(2, 8, 16, 16)).shape
    torch.Size([2, 8, 16, 16])
"""

from . import functional, losses, reference, stats, testing
from .convert import (
    LegacyLoadResult,
    load_legacy_state_dict,
    strip_legacy_running_stats,
    style_parameters,
    to_conditional,
    to_stylenorm,
    to_torch,
)
from .functional import StyleRegion
from .losses import (
    CONVENTIONS,
    GramLoss,
    MeanStdLoss,
    MMDLoss,
    StyleConvention,
    StyleLoss,
    get_convention,
)
from .norm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
)
from .style import (
    AdaIN,
    ConditionalInstanceNorm1d,
    ConditionalInstanceNorm2d,
    ConditionalInstanceNorm3d,
    StyleAdaIN,
    StyleSequential,
)
from .sync import SyncBatchNorm

__version__ = "0.1.0"

__all__ = [
    "CONVENTIONS",
    "AdaIN",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "ConditionalInstanceNorm1d",
    "ConditionalInstanceNorm2d",
    "ConditionalInstanceNorm3d",
    "GramLoss",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LegacyLoadResult",
    "MMDLoss",
    "MeanStdLoss",
    "StyleAdaIN",
    "StyleConvention",
    "StyleLoss",
    "StyleRegion",
    "StyleSequential",
    "SyncBatchNorm",
    "functional",
    "get_convention",
    "load_legacy_state_dict",
    "losses",
    "reference",
    "stats",
    "strip_legacy_running_stats",
    "style_parameters",
    "testing",
    "to_conditional",
    "to_stylenorm",
    "to_torch",
]
