"""Test configuration.

On a machine without a CUDA device the Triton kernels run under the interpreter, which must be
switched on before Triton is first imported: that is done here, before any test module loads.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
