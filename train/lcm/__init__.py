"""Latent consistency distillation: ``toolkit train lcm`` / ``lcm-at``, its losses, the teacher and the defaults."""
