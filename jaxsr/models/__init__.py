"""Flax Linen networks: UNet, ControlNet, VAE, text encoder, DAPE."""
