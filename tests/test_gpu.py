"""Checks that need a CUDA GPU; each is skipped without one, so CI (which has none) skips them all.

    python -m pytest -q tests/test_gpu.py      # on a GPU machine; benchmarks/gpu_checks.sh runs it first

- FlexAttention, the thought attention CUDA uses by default, compiled, against the sequential
  oracle: losses, rewards and every gradient in fp32, as ``test_formulations.py`` checks the CPU
  backends, at thought lengths past torch's recompile limit, with the silent fall-back to the
  eager FlexAttention turned into an error.
- A 1-GPU ZeRO-3 run of the recipe: the model is built inside ``deepspeed.zero.Init``, the first
  step equals a ZeRO-2 run's, and ``final/`` holds the whole model.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from helpers import ROOT, free_port, padded_batch, run, training_fixture
from test_formulations import assert_same_step, close, step, trained_looking_model
from test_train import recipe_args
from transformers import AutoModelForCausalLM

from quietstar.training.pretrain import STEP_METRICS
from quietstar.training.run_log import read_metrics

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

WIDER = dict(hidden_size=64, intermediate_size=128)  # 4 heads of 16 dimensions (the CPU tests' have 8): the compiled
# FlexAttention needs 16 or more on CUDA
FLEX_CASES = [  # family, R, M, K: M = 8 and up made more graphs than torch's recompile limit before
    ("llama", 2, 8, 4),
    ("mistral", 3, 12, 2),
    ("qwen2", 2, 16, 3),
]


@pytest.mark.parametrize("family,R,M,K", FLEX_CASES)
def test_compiled_flex_attention_on_cuda_matches_the_sequential_oracle(family, R, M, K):
    settings = dict(thought_len=M, n_true=K, n_thoughts=R, positive_rewards_only=False, policy_temperature=1.5,
                    policy_loss_weight=1.0, loss_reduction="reference" if M % 2 else "token")
    oracle = trained_looking_model(family, "sequential", lm_settings=WIDER, **settings).cuda()
    efficient = trained_looking_model(family, "efficient", lm_settings=WIDER, attention_backend="flex", **settings).cuda()
    ids, mask = (t.cuda() for t in padded_batch(seed=M, lengths=(9, 6, 3)))
    thoughts = oracle.sample_thoughts(ids, mask, generator=torch.Generator(device="cuda").manual_seed(M))
    reference = step(oracle, ids, mask, thoughts)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="flex_attention called without torch.compile")
        with torch.no_grad():
            greedy = efficient.sample_thoughts(ids, mask, greedy=True)
            ref_rollout = oracle.rollout(ids, mask, thoughts=thoughts)[1]
            rollout = efficient.rollout(ids, mask, thoughts=thoughts)[1]
        candidate = step(efficient, ids, mask, thoughts)
    valid = mask.bool()
    assert torch.equal(greedy[valid], oracle.sample_thoughts(ids, mask, greedy=True)[valid])
    close(rollout.thought_logprobs[valid], ref_rollout.thought_logprobs[valid], "thought_logprobs")
    assert_same_step(reference, candidate, ref_rollout.thought_logprobs)


def test_heads_too_narrow_for_the_compiled_flex_attention_fail_in_one_line():
    model = trained_looking_model("llama", "efficient", thought_len=2, attention_backend="flex").cuda()  # heads of 8
    ids, mask = (t.cuda() for t in padded_batch())
    with pytest.raises(ValueError, match="heads of 16 or more dimensions on CUDA, and this model's have 8"):
        model.sample_thoughts(ids, mask, greedy=True)


def test_a_one_gpu_zero3_run_builds_the_model_partitioned_and_takes_zero2s_first_step(tmp_path):
    """Through `deepspeed --num_gpus 1 launch/pretrain.sh`, in bf16 (the CUDA default precision), with the
    compiled FlexAttention (heads of 16 dimensions)."""
    root = training_fixture(tmp_path, **WIDER)
    for zero in (2, 3):
        run(["deepspeed", "--num_gpus", "1", "--master_port", str(free_port()), str(ROOT / "launch" / "pretrain.sh"),
             *recipe_args(root, tmp_path / f"zero{zero}", zero=zero, max_steps=2)])
    config = json.loads((tmp_path / "zero3" / "config.json").read_text())
    assert config["load"]["partitioned"] and config["world_size"] == 1, config["load"]
    first = [read_metrics(tmp_path / f"zero{zero}")[0] for zero in (2, 3)]
    for name in STEP_METRICS:
        assert first[1][name] == pytest.approx(first[0][name], rel=1e-5, abs=1e-6), name
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "zero3" / "final")
    initial = AutoModelForCausalLM.from_pretrained(root / "model")
    assert sum(p.numel() for p in exported.parameters()) == sum(p.numel() for p in initial.parameters())
