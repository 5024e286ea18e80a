"""``torch.library`` custom ops: one file per op, each with its fake kernel, its backward op and
its autograd registration. Importing this package registers them."""

from mmfast.ops import mutual_kd, routed_kd  # noqa: F401
