"""``nn.Module`` wrappers of the functional losses, and the teacher router."""

from mmfast.nn.channel_mask import ChannelMask, ChannelMaskHandle, attach_channel_mask
from mmfast.nn.fdiv import DensityRatioNormalizer, FDistillLoss, UniInstructLoss
from mmfast.nn.routed_kd import RoutedKDLoss
from mmfast.nn.router import RouterOutput, TeacherRouter
from mmfast.nn.unimodal_teacher import UMTLoss, UniModalTeacherLoss

__all__ = [
    "ChannelMask",
    "ChannelMaskHandle",
    "DensityRatioNormalizer",
    "FDistillLoss",
    "RoutedKDLoss",
    "RouterOutput",
    "TeacherRouter",
    "UMTLoss",
    "UniInstructLoss",
    "UniModalTeacherLoss",
    "attach_channel_mask",
]
