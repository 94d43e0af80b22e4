"""``SamplingPlan`` (eval/generate.py): its ``record()`` keys the feature caches of sample-fid and compare (and the
studies' cells built on them), so it must not change for the same plan. The records below were computed by the
code before the plan held a ``GenerationOptions`` (issue 30) and are pinned byte for byte."""
from __future__ import annotations

import dataclasses
import json
import types

import numpy as np
import pytest

from atdiff.eval.generate import SamplingPlan, sample_producer
from atdiff.runtime.errors import ToolkitError
from atdiff.runtime.generation import GenerationOptions

PINNED = [
    (dict(steps=10),
     '{"steps": 10, "sampler": null, "seed": 0, "num_prompts": 0, "prompts_sha1": null, "guidance_scale": null}'),
    (dict(steps=4, sampler="lcm", seed=7, batch_size=3, prompts=("a red cat", "a dog"), guidance_scale=8.5),
     '{"steps": 4, "sampler": "lcm", "seed": 7, "num_prompts": 2, "prompts_sha1": '
     '"deefbebfcf0a5c6ffc1eec6d4e4491a0b1db7010", "guidance_scale": 8.5}'),
    (dict(steps=10, sampler="ddim", seed=9_000_000, eps_scale=1.017,
          sampler_options={"use_clipped_model_output": True, "eta": 0.0}),
     '{"steps": 10, "sampler": "ddim", "seed": 9000000, "num_prompts": 0, "prompts_sha1": null, '
     '"guidance_scale": null, "eps_scale": 1.017, "sampler_options": {"eta": 0.0, "use_clipped_model_output": true}}'),
    (dict(steps=2, sampler="dpmpp_2m", eps_scale=1.0, guidance_scale=None, sampler_options={}),
     '{"steps": 2, "sampler": "dpmpp_2m", "seed": 0, "num_prompts": 0, "prompts_sha1": null, '
     '"guidance_scale": null, "eps_scale": 1.0}'),
]


def _plan(**fields) -> SamplingPlan:
    return SamplingPlan(GenerationOptions(**fields))


@pytest.mark.parametrize("fields, record", PINNED)
def test_the_record_of_a_plan_is_unchanged(fields, record):
    assert json.dumps(_plan(**fields).record()) == record


@pytest.mark.parametrize("fields, message", [
    (dict(), "names its steps and seed"),
    (dict(steps=2, seed=None), "names its steps and seed"),
    (dict(steps=2, height=64), r"does not take \['height'\]"),           # not in the record: caches would mix
    (dict(steps=2, num_images=4, seeds=[1]), r"\['num_images', 'seeds'\]"),  # the producer's, per chunk
    (dict(steps=0), "steps must be at least 1"),                           # GenerationOptions.precheck's checks
    (dict(steps=2, eps_scale=-1.0), "eps_scale must be positive"),
    (dict(steps=2, guidance_scale=-2.0), "guidance_scale must be >= 0"),
    (dict(steps=2, sampler="euler"), "unknown sampler 'euler'"),
])
def test_a_plan_is_checked_as_it_is_made(fields, message):
    with pytest.raises(ToolkitError, match=message):
        SamplingPlan(GenerationOptions(**fields))


class _Pipe:
    """Records the options each chunk is generated with."""

    def __init__(self, is_latent: bool, classes: int | None = None):
        self.spec = types.SimpleNamespace(name="fake", is_latent=is_latent, num_class_embeds=classes)
        self.calls = []

    def generate(self, options, progress=None):
        self.calls.append(options)
        count = len(options.seeds)
        return types.SimpleNamespace(arrays=np.zeros((count, 2, 2, 3), np.uint8))


def test_a_chunk_is_the_plans_options_with_its_seeds_prompts_and_labels():
    plan = _plan(steps=4, sampler="lcm", seed=10, prompts=("a", "b", "c"), guidance_scale=8.5, eps_scale=1.017,
                 sampler_options={"eta": 0.5})
    pipe = _Pipe(is_latent=True)
    assert sample_producer(pipe, plan)(2, 5).shape == (3, 2, 2, 3)
    assert pipe.calls == [dataclasses.replace(plan.options, seeds=[12, 13, 14], prompts=["c", "a", "b"],
                                              batch_size=3)]
    pipe = _Pipe(is_latent=False, classes=4)
    sample_producer(pipe, _plan(steps=2, seed=1, batch_size=2, guidance_scale=3.0))(3, 6)
    assert pipe.calls == [GenerationOptions(steps=2, seed=1, seeds=[4, 5, 6], batch_size=2, num_images=3,
                                            class_labels=[3, 0, 1])]   # no guidance for an unconditional model
