"""PyTorch / diffusers / LDM checkpoints <-> Flax param trees (strict)."""
