"""The training core every family shares: the trainer loop and its run directory (state, lock, log), the batch order,
free-AT's adversarial steps, the datasets and the tiny test models."""
