"""Runnable experiments built on the mmfast losses (``python -m mmfast.recipes.<name>``).

- ``one_step_ring``: one-step diffusion distillation of a 2-D ring with the f-divergence losses.
- ``mst_distill``: MST-Distill's three stages (co-training, channel masks, routed KD) on AV-Digits.
- ``_common``: the AV-Digits recipes' shared models, training loop, evaluation and result records.
"""
