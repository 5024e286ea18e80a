"""Triton kernels (the default GPU backend): ``routed_kd.routed_kd_rows`` and ``mutual_kd.mutual_kd_rows``,
one launch each, with the contract of ``mmfast.reference``. Imported lazily by ``mmfast.ops``."""
