"""The emulated computational storage device: sharded tables, tiers, optimizers, service."""
