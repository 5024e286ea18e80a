"""``torch.library`` custom ops: one file per op, each with its fake kernel, its backward op and
its autograd registration. Importing this package registers them."""

from mmfast.ops import fake_score, fdistill, masked_reconstruction, mutual_kd, routed_kd, uni_instruct  # noqa: F401
