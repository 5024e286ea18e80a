"""``torch.library`` custom ops: one file per op, each with its fake kernel, its backward op and
its autograd registration. Importing this package registers them.

The public functions call each forward op through its ``run_<op>`` (:class:`mmfast.ops._eager_path.OpRunner`):
in plain eager mode the op's implementation runs without torch.library's dispatch (same implementation,
same backward), anywhere else (torch.compile, tracing, modes, tensor subclasses) the op itself."""

from mmfast.ops import fake_score, fdistill, masked_reconstruction, mutual_kd, routed_kd, uni_instruct  # noqa: F401
