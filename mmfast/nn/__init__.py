"""``nn.Module`` wrappers of the functional losses, and the teacher router."""

from mmfast.nn.routed_kd import RoutedKDLoss
from mmfast.nn.router import RouterOutput, TeacherRouter

__all__ = ["RoutedKDLoss", "RouterOutput", "TeacherRouter"]
