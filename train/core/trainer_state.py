"""What the trainer keeps besides accelerate's model / optimizer / RNG state: the LR schedule, the EMA, its own
counters and a stateful objective, saved as ``trainer_object_N.pt`` in each checkpoint.

They are saved and loaded here, not through accelerate's ``register_for_checkpointing``: accelerate loads those
files with ``weights_only=False``, so a crafted ``custom_checkpoint_N.pkl`` in a run directory would run code on
``--resume``. Checkpoints written through accelerate's hook (same order, ``custom_checkpoint_N.pkl``) are renamed
on resume (accelerate refuses a folder holding files it did not register) and then load the same safe way.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers.training_utils import EMAModel

from atdiff.runtime.errors import ToolkitError

STATE_FILE = "trainer_object_"   # + index + .pt


class ConstantDecayEMA(EMAModel):
    """diffusers' EMAModel without its warm-up: every update uses ``decay`` (its checkpointing is kept)."""

    def get_decay(self, optimization_step: int) -> float:
        return self.decay


class Counters:
    """The trainer's own counters (optimizer steps), checkpointed beside its other states."""

    def __init__(self, trainer):
        self.trainer = trainer

    def state_dict(self) -> dict[str, int]:
        return {"optimizer_steps": self.trainer.optimizer_steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.trainer.optimizer_steps = int(state["optimizer_steps"])


def save_states(objects: list, checkpoint: Path) -> None:
    for index, obj in enumerate(objects):
        torch.save(obj.state_dict(), checkpoint / f"{STATE_FILE}{index}.pt")


def load_states(objects: list, checkpoint: Path) -> None:
    for index, obj in enumerate(objects):
        obj.load_state_dict(_load_plain(checkpoint / f"{STATE_FILE}{index}.pt"))


def migrate_legacy_states(checkpoint: Path) -> None:
    for legacy in checkpoint.glob("custom_checkpoint_*.pkl"):
        legacy.rename(checkpoint / f"{STATE_FILE}{legacy.stem.rsplit('_', 1)[1]}.pt")


def _load_plain(path: Path):
    """A torch-saved state of tensors and plain values, loaded with weights_only=True (accelerate's ``load`` adds
    its numpy allow-list): anything else in the file is refused, never executed."""
    import pickle

    from accelerate.utils import load
    try:
        return load(path, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, AttributeError) as exc:
        raise ToolkitError(f"checkpoint file {path} holds something other than tensors and plain values, so it was "
                           f"not written by this trainer and is not loaded ({str(exc).splitlines()[0][:120]}); "
                           "delete that checkpoint or start a new --out") from None
    except FileNotFoundError:
        raise ToolkitError(f"checkpoint {path.parent} is incomplete ({path.name} is missing); delete it to resume "
                           "from the one before") from None
