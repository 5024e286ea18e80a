"""Pure-PyTorch references: forward and explicit backward formulas, the oracle of every backend."""
