"""The shared trainer: exact resume, Ctrl-C, checkpoints, export, batch order, device errors."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from atdiff.runtime.errors import ToolkitError
from atdiff.train.core.batch_order import StepBatchSampler
from atdiff.train.core.trainer import StepContext, Trainer, TrainerConfig, claim_run_dir
from tolerance import EPS32, assert_close_scaled


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps process-wide singletons; each test builds its own Accelerator."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield


class ToyDataset(torch.utils.data.Dataset):
    def __init__(self, n: int = 24):
        self.x = torch.randn(n, 4, generator=torch.Generator().manual_seed(1))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "index": i}


def toy_model() -> torch.nn.Module:
    torch.manual_seed(0)
    # Dropout draws from the global RNG, so exact resume also needs accelerate's RNG states.
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 4))


class ToyObjective:
    """Noise from ctx.generator, `inner` optimizer steps per batch (as free AT makes)."""

    def __init__(self, inner: int = 1, on_step=None, noise_scale: float = 1.0):
        self.optimizer_steps_per_batch = inner
        self.noise_scale = noise_scale
        self.on_step = on_step
        self.seen: list[list[int]] = []

    def __call__(self, ctx: StepContext, micro_batches: list) -> dict[str, float]:
        self.seen.append([i for mb in micro_batches for i in mb["index"].tolist()])
        noise = [self.noise_scale * torch.randn(mb["x"].shape, generator=ctx.generator) for mb in micro_batches]

        def loss_fn(i, mb):
            return (ctx.model(mb["x"] + noise[i]) - mb["x"]).pow(2).mean()

        losses = [ctx.update(micro_batches, loss_fn) for _ in range(self.optimizer_steps_per_batch)]
        if self.on_step is not None:
            self.on_step(ctx.step)
        return {"loss": losses[-1]}


def config(tmp_path, **kw) -> TrainerConfig:
    base = dict(run_dir=tmp_path / "run", max_steps=6, batch_size=4, lr=1e-2, device="cpu",
                seed=3, ema_decay=0.9, progress=False, log_every=1)
    return TrainerConfig(**{**base, **kw})


def export_state_dict(model: torch.nn.Module, out_dir) -> None:
    torch.save(model.state_dict(), out_dir / "weights.pt")


def final_state(tmp_path, name: str) -> tuple[dict, dict]:
    model_sd = torch.load(tmp_path / name / "model" / "weights.pt")
    trainer_state = json.loads(max((tmp_path / name / "checkpoints").glob("step-*/trainer_state.json")).read_text())
    return model_sd, trainer_state


def test_resume_after_n_steps_equals_uninterrupted_run_bitwise(tmp_path):
    whole = Trainer(config(tmp_path, run_dir=tmp_path / "a"))
    whole_model = toy_model()
    whole.fit(whole_model, ToyDataset(), ToyObjective(inner=2), export=export_state_dict)

    first = Trainer(config(tmp_path, run_dir=tmp_path / "b", max_steps=3))
    first.fit(toy_model(), ToyDataset(), ToyObjective(inner=2))
    second = Trainer(config(tmp_path, run_dir=tmp_path / "b", resume=True))
    resumed_model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 4))
    result = second.fit(resumed_model, ToyDataset(), ToyObjective(inner=2), export=export_state_dict)

    assert result.step == 6 and result.optimizer_steps == 12
    for key, value in whole_model.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[key]), key
    a, b = torch.load(tmp_path / "a/model/weights.pt"), torch.load(tmp_path / "b/model/weights.pt")
    for key in a:
        assert torch.equal(a[key], b[key]), f"EMA export differs at {key}"


def test_a_new_run_over_an_existing_one_is_refused(tmp_path):
    # it used to train from scratch, appending to the old metrics.jsonl and keeping the old run's later
    # checkpoints for a future --resume to pick up
    Trainer(config(tmp_path, max_steps=3)).fit(toy_model(), ToyDataset(), ToyObjective())
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(ToolkitError, match="already holds a training run .*--resume"):
        Trainer(config(tmp_path, max_steps=2)).fit(toy_model(), ToyDataset(), ToyObjective())
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics


def test_ctrl_c_saves_a_checkpoint_and_stops_cleanly(tmp_path):
    def interrupt(step):
        if step == 1:  # during the second step
            os.kill(os.getpid(), signal.SIGINT)

    # what was installed before: Python's default_int_handler, or SIG_IGN where the tests run as a background job
    before = signal.getsignal(signal.SIGINT)
    result = Trainer(config(tmp_path)).fit(toy_model(), ToyDataset(), ToyObjective(on_step=interrupt),
                                           export=export_state_dict)
    assert result.interrupted and result.step == 2 and result.model_dir is None
    state = json.loads((tmp_path / "run/checkpoints/step-2/trainer_state.json").read_text())
    assert state["step"] == 2 and state["optimizer_steps"] == 2
    assert signal.getsignal(signal.SIGINT) is before   # the trainer's handler is gone again
    lines = (tmp_path / "run/metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]  # the stop step is logged once, with its loss
    assert all("loss" in json.loads(line) for line in lines)


def test_checkpoints_are_written_every_n_steps_without_temp_dirs(tmp_path):
    Trainer(config(tmp_path, save_every=2, max_steps=5)).fit(toy_model(), ToyDataset(), ToyObjective())
    names = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    assert names == ["step-2", "step-4", "step-5"]
    for name in names:
        files = {p.name for p in (tmp_path / "run/checkpoints" / name).iterdir()}
        assert {"trainer_state.json", "optimizer.bin", "random_states_0.pkl"} <= files
        assert any(f.startswith("model") for f in files)
    lines = (tmp_path / "run/metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5]
    assert {"loss", "lr", "images_per_s", "optimizer_steps"} <= set(json.loads(lines[0]))


def test_objective_controls_the_number_of_optimizer_steps(tmp_path):
    result = Trainer(config(tmp_path, max_steps=2)).fit(toy_model(), ToyDataset(), ToyObjective(inner=3))
    assert result.optimizer_steps == 6


def test_export_writes_ema_weights_by_default(tmp_path):
    trainer = Trainer(config(tmp_path, max_steps=3))
    model = toy_model()
    trainer.fit(model, ToyDataset(), ToyObjective(), export=export_state_dict)
    exported = torch.load(tmp_path / "run/model/weights.pt")
    shadow = dict(zip([k for k, _ in model.named_parameters()], trainer.ema.shadow_params))
    for key, value in shadow.items():
        assert torch.equal(exported[key], value)
        assert not torch.equal(exported[key], model.state_dict()[key])  # EMA lags the raw weights


def test_grad_accum_matches_one_big_batch(tmp_path):
    def run(name, accum):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 4)
        Trainer(config(tmp_path, run_dir=tmp_path / name, grad_accum=accum, max_steps=2)).fit(
            model, ToyDataset(), ToyObjective(noise_scale=0.0))
        return model.weight.detach()

    # per optimizer step, the two gradients (one batch mean vs two half-batch means) differ by a few float32
    # roundings, which lr = 1e-2 shrinks far below a weight's ulp; w - update then rounds 1 ulp apart at most
    one, two = run("one", 1), run("two", 2)
    assert_close_scaled(two, one, 2 * 2 * EPS32)   # 2 steps x (<= EPS32 of the weights, + the update's share)


def test_batch_order_is_a_function_of_seed_and_step():
    whole = StepBatchSampler(10, 4, 1, 1, 0, seed=5, start_step=0, max_steps=5)
    resumed = StepBatchSampler(10, 4, 1, 1, 0, seed=5, start_step=3, max_steps=5)
    assert list(whole)[3:] == list(resumed)
    # 2 processes x 2 micro-batches see exactly the samples of the single-process step.
    ranks = [list(StepBatchSampler(10, 4, 2, 2, rank, seed=5, start_step=0, max_steps=5)) for rank in (0, 1)]
    for step, batch in enumerate(whole):
        parts = [i for r in ranks for mb in r[2 * step:2 * step + 2] for i in mb]
        assert sorted(parts) == sorted(batch)
    flat = [i for b in whole for i in b]
    assert sorted(flat[:10]) == list(range(10)), "an epoch visits every sample once"
    assert flat[:10] != flat[10:20], "each epoch is reshuffled"


def test_cuda_without_gpu_is_an_error_not_a_cpu_run(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the error path needs one without")
    with pytest.raises(ToolkitError, match="no CUDA GPU"):
        Trainer(config(tmp_path, device="cuda")).fit(toy_model(), ToyDataset(), ToyObjective())
    with pytest.raises(ToolkitError, match="fp16 needs a CUDA GPU"):
        Trainer(config(tmp_path, mixed_precision="fp16")).fit(toy_model(), ToyDataset(), ToyObjective())


def test_bad_batch_split_is_a_clear_error(tmp_path):
    with pytest.raises(ToolkitError, match="divisible"):
        Trainer(config(tmp_path, batch_size=5, grad_accum=2)).fit(toy_model(), ToyDataset(), ToyObjective())


def test_a_second_trainer_on_a_running_run_dir_is_refused_naming_the_holder(tmp_path):
    import subprocess
    import sys
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        claim_run_dir(tmp_path / "run", resume=True)   # the holder made the run directory (its marker)
        (tmp_path / "run" / ".lock").write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename,
                                                            "started": "2026-11-29 12:00:00"}))
        with pytest.raises(ToolkitError, match=f"in use by another trainer \\(pid {holder.pid}"):
            Trainer(config(tmp_path, max_steps=1, resume=True)).fit(toy_model(), ToyDataset(), ToyObjective())
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale and taken over; the lock goes away with the run
    Trainer(config(tmp_path, max_steps=1, resume=True)).fit(toy_model(), ToyDataset(), ToyObjective())
    assert not (tmp_path / "run" / ".lock").exists()


def test_resume_cuts_metrics_back_to_the_checkpoint(tmp_path):
    Trainer(config(tmp_path, max_steps=2, save_every=2)).fit(toy_model(), ToyDataset(), ToyObjective())
    metrics = tmp_path / "run" / "metrics.jsonl"
    with metrics.open("a") as handle:  # a killed run logged step 3 but died before its checkpoint
        handle.write(json.dumps({"step": 3, "loss": 1.0, "time": 0}) + "\n")
    Trainer(config(tmp_path, max_steps=4, save_every=2, resume=True)).fit(toy_model(), ToyDataset(), ToyObjective())
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 4]


def test_a_crafted_pickle_in_a_checkpoint_runs_no_code_on_resume(tmp_path):
    """issue 12: accelerate loaded custom states with weights_only=False, so this file ran code on --resume."""
    import pickle
    Trainer(config(tmp_path, max_steps=1, save_every=1)).fit(toy_model(), ToyDataset(), ToyObjective())
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    state = next((tmp_path / "run/checkpoints/step-1").glob("trainer_object_0.pt"))
    state.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(ToolkitError, match="not written by this trainer"):
        Trainer(config(tmp_path, max_steps=2, resume=True)).fit(toy_model(), ToyDataset(), ToyObjective())
    assert not marker.exists()


def test_checkpoints_of_the_accelerate_hook_layout_still_resume(tmp_path):
    """Checkpoints written before the trainer saved its own states (custom_checkpoint_N.pkl) resume."""
    Trainer(config(tmp_path, max_steps=2, save_every=2)).fit(toy_model(), ToyDataset(), ToyObjective())
    step = tmp_path / "run/checkpoints/step-2"
    for path in step.glob("trainer_object_*.pt"):
        path.rename(step / f"custom_checkpoint_{path.stem.rsplit('_', 1)[1]}.pkl")
    result = Trainer(config(tmp_path, max_steps=3, resume=True)).fit(toy_model(), ToyDataset(), ToyObjective())
    assert result.step == 3 and result.optimizer_steps == 3
