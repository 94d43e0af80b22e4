"""``toolkit train classifier``: the small Fashion-MNIST CNN that ``toolkit eval`` uses as its in-domain
feature extractor (classifier FID) and as the judge of prompt adherence (eval/classifier.py).

It reuses the shared trainer (checkpoints, exact resume, Ctrl-C, metrics) with a cross-entropy objective;
training images get a random +-2 pixel shift (drawn from the step's generator, so resume stays exact).
The export is ``model/fmnist-classifier.safetensors`` plus a JSON card with the test-split accuracy; copying
both into eval/assets/ makes them the shipped default.
"""
from __future__ import annotations

import json
from pathlib import Path

import typer

from atdiff.runtime.errors import ToolkitError, handles_errors
from atdiff.train.demo.cli_options import DEVICE, RESUME, SAVE_EVERY, SEED, report

WEIGHTS_NAME = "fmnist-classifier.safetensors"


def random_shift(x, generator, pad: int = 2):
    """Each image shifted by up to ``pad`` pixels in each direction; the uncovered border is background (-1)."""
    import torch
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=-1.0)
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator, device=generator.device).tolist()
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])


class ClassifierObjective:
    optimizer_steps_per_batch = 1

    def __call__(self, ctx, micro_batches: list) -> dict[str, float]:
        import torch.nn.functional as F
        correct = []

        def loss_fn(i, mb):
            logits, _ = ctx.model(random_shift(mb["x"], ctx.generator))
            correct.append((logits.argmax(1) == mb["label"]).float().mean().item())
            return F.cross_entropy(logits, mb["label"])

        loss = ctx.update(micro_batches, loss_fn)
        return {"loss": loss, "train_accuracy": sum(correct) / len(correct)}


def test_accuracy(weights: Path, data: str = "fashion-mnist") -> float:
    """Accuracy of the saved weights on the data set's 10k test split."""
    from atdiff.eval.classifier import FashionClassifierFeatures
    from atdiff.eval.sources import dataset_labels, dataset_source
    classifier = FashionClassifierFeatures(weights, device="cpu")
    predicted = classifier.predict(dataset_source(data, "test").images)
    return float((predicted == dataset_labels(data, "test")).mean())


def _export(record: dict):
    def export(model, out_dir: Path) -> None:
        from safetensors.torch import save_file

        from atdiff.runtime.provenance import files_sha256
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / WEIGHTS_NAME))
        accuracy = test_accuracy(out_dir / WEIGHTS_NAME)
        card = {**record, "test_accuracy": accuracy, "test_split": "fashion-mnist t10k (10,000 images)",
                "files_sha256": files_sha256(out_dir)}
        (out_dir / WEIGHTS_NAME).with_suffix(".json").write_text(json.dumps(card, indent=2))
    return export


def train_classifier(*, out: Path, max_steps: int = 3000, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                     save_every: int = 500, resume: bool = False, device: str = "auto", progress: bool = True):
    import torch

    from atdiff.eval.classifier import NETWORK, build_network
    from atdiff.train.core.image_data import load_image_dataset
    from atdiff.runtime.provenance import versions
    from atdiff.train.core.trainer import Trainer, TrainerConfig
    dataset = load_image_dataset("fashion-mnist", None, class_cond=True)
    if (dataset.info.channels, dataset.info.resolution) != (1, 28):
        raise ToolkitError("the classifier is for 28x28 grayscale Fashion-MNIST")
    torch.manual_seed(seed)
    model = build_network()
    record = {"command": "toolkit train classifier", "network": NETWORK,
              "options": dict(max_steps=max_steps, batch_size=batch_size, lr=lr, seed=seed),
              "data": dataset.info.to_json(), "versions": versions("train")}
    config = TrainerConfig(run_dir=Path(out), max_steps=max_steps, batch_size=batch_size, lr=lr, weight_decay=1e-4,
                           max_grad_norm=None, ema_decay=None, device=device, seed=seed, save_every=save_every,
                           resume=resume, log_every=50, export_weights="raw", progress=progress,
                           command_config=record)
    return Trainer(config).fit(model, dataset, ClassifierObjective(), export=_export(record))


def register(app: typer.Typer) -> None:
    @app.command("classifier")
    @handles_errors
    def classifier(out: Path = typer.Option(Path("runs/fmnist-classifier"), help="Run directory."),
                   max_steps: int = typer.Option(3000, help="Training steps (batches)."),
                   batch_size: int = typer.Option(128, help="Images per step."),
                   lr: float = typer.Option(2e-3, help="AdamW learning rate."),
                   seed: int = SEED,
                   save_every: int = SAVE_EVERY,
                   resume: bool = RESUME,
                   device: str = DEVICE) -> None:
        """Train the Fashion-MNIST classifier used for classifier FID and prompt adherence (toolkit eval)."""
        result = train_classifier(out=out, max_steps=max_steps, batch_size=batch_size, lr=lr, seed=seed,
                                  save_every=save_every, resume=resume, device=device)
        if result.model_dir is not None:
            card = json.loads((result.model_dir / WEIGHTS_NAME).with_suffix(".json").read_text())
            typer.echo(f"test accuracy {card['test_accuracy']:.4f}")
        report(result, "weights")
