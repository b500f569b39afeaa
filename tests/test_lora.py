"""LoRA (peft) on the base LM of either method: the exactness oracles hold, only the intended parameters train,
and a recipe run exports merged weights that a stock AutoModelForCausalLM loads, with the adapters beside them."""

from __future__ import annotations

import json
import random

import pytest
import torch
from helpers import (
    ROOT,
    assert_step_matches_oracle,
    free_port,
    independent_coconut,
    move_off_init,
    padded_batch,
    run,
    tiny_lm,
    tiny_tokenizer,
)
from peft import PeftModel
from test_coconut_model import ROWS, perturbed
from transformers import AutoModelForCausalLM

from quietstar import QuietStarConfig, QuietStarModel
from quietstar.coconut.config import CoconutConfig
from quietstar.coconut.curriculum import collate
from quietstar.coconut.model import CoconutModel
from quietstar.core.lora import add_lora, lora_config
from quietstar.core.optim import build_param_groups
from quietstar.training.train_config import DS_CONFIGS

ATOL = 2e-5


def with_lora(lm, target_modules: str = "all-linear"):
    """``lm`` with rank-4 adapters whose B is random (peft starts B at zero, which would make the tests vacuous)."""
    add_lora(lm, lora_config(rank=4, alpha=8.0, dropout=0.0, target_modules=target_modules))
    torch.manual_seed(7)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return lm


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_quiet_star_losses_and_gradients_match_the_oracle_on_a_lora_base(family):
    torch.manual_seed(1)
    config = QuietStarConfig(thought_len=2, n_true=3, n_thoughts=3, policy_loss_weight=1.0, policy_temperature=2.0)
    model = move_off_init(QuietStarModel(with_lora(tiny_lm(family)), tiny_tokenizer(), config))
    with torch.no_grad():
        model.mixing_head.mlp[-1].weight.normal_(0, 0.5)
    ids, mask = padded_batch(seed=5, lengths=(6, 4))
    thoughts = model.sample_thoughts(ids, mask, generator=torch.Generator().manual_seed(1))

    out = assert_step_matches_oracle(model, ids, mask, thoughts, atol=ATOL)
    assert out.policy_loss.abs() > 1e-4  # the comparison is not vacuous
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in name for name in trained) and not any("base_layer" in name for name in trained)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_coconut_batched_latents_match_the_loop_on_a_lora_base(family):
    torch.manual_seed(0)
    model = perturbed(CoconutModel(with_lora(tiny_lm(family)), tiny_tokenizer(), CoconutConfig()))
    batch = collate(ROWS, pad_id=0)
    out = model(batch["input_ids"], batch["attention_mask"], batch["labels"])
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    _, ref_loss = independent_coconut(model, ROWS)
    ref_loss.backward()
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        p = dict(model.named_parameters())[name]
        assert (grad - p.grad).norm() <= 1e-4 * p.grad.norm().clamp(min=1e-8) + 1e-7, name
    assert any("lora_B" in name for name in grads) and model.markers.bot.grad.abs().sum() > 0


@pytest.mark.parametrize("method", ["quietstar", "coconut"])
def test_an_optimizer_step_moves_only_the_adapters_and_the_methods_own_modules(method):
    torch.manual_seed(0)
    lm = with_lora(tiny_lm("llama"))
    if method == "quietstar":
        model = move_off_init(QuietStarModel(lm, tiny_tokenizer(), QuietStarConfig(thought_len=2, n_true=2)), head_scale=0.3)
        ids, mask = padded_batch(seed=2, lengths=(6, 5))
        loss = model(ids, mask, generator=torch.Generator().manual_seed(0)).loss
    else:
        model = perturbed(CoconutModel(lm, tiny_tokenizer(), CoconutConfig()))
        batch = collate(ROWS, pad_id=0)
        loss = model(batch["input_ids"], batch["attention_mask"], batch["labels"]).loss
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(build_param_groups(model, lr=1e-2, weight_decay=0.01))
    loss.backward()
    optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    own = {name for name in before if not name.startswith("lm.")}
    adapters = {name for name in before if "lora_" in name}
    assert changed == own | adapters, sorted(changed ^ (own | adapters))


def test_a_lora_recipe_run_exports_merged_weights_and_the_adapters(tmp_path):
    """2 ranks, ZeRO-3 (adapters on a partitioned base), Coconut with LoRA on a tiny Llama: final/ is a stock checkpoint equal to base + merged adapters."""
    tiny_lm("llama").save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    rng = random.Random(0)
    for split, n in (("train", 16), ("val", 4)):
        with (tmp_path / f"{split}.jsonl").open("w") as f:
            for _ in range(n):
                a, b = rng.randint(0, 4), rng.randint(0, 4)
                f.write(json.dumps({"question": f"the sum of {a} and {b} is", "steps": [f"{a} plus {b}"], "answer": str(a + b)}) + "\n")
    out = tmp_path / "run"
    run(["bash", str(ROOT / "launch" / "coconut.sh"), "--num-gpus", "2", "--master-port", str(free_port()),
         "--model", str(tmp_path / "model"), "--train-file", str(tmp_path / "train.jsonl"), "--val-file", str(tmp_path / "val.jsonl"),
         "--output-dir", str(out), "--deepspeed", str(DS_CONFIGS / "zero3.json"), "--num-epochs", "2", "--max-latent-stage", "1",
         "--epochs-per-stage", "1", "--marker-init-text=---", "--micro-batch-size", "2", "--grad-accum-steps", "1",
         "--lr", "1e-2", "--val-max-new-tokens", "4", "--lora-rank", "4", "--lora-alpha", "8"])
    load = json.loads((out / "config.json").read_text())["load"]
    assert load["lora"]["rank"] == 4 and 0 < load["lora"]["adapter_parameters"] < load["base_parameters"] / 4

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    merged = AutoModelForCausalLM.from_pretrained(out / "final")  # a stock checkpoint: no peft keys left
    assert set(merged.state_dict()) == set(base.state_dict())
    rebuilt = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "model"), out / "final" / "adapter").merge_and_unload()
    changed = 0
    for name, weight in merged.state_dict().items():
        torch.testing.assert_close(weight, rebuilt.state_dict()[name], rtol=0, atol=1e-6, msg=name)
        changed += not torch.equal(weight, base.state_dict()[name])
    assert changed > 0  # the adapters trained and were merged
    assert torch.equal(merged.model.embed_tokens.weight, base.model.embed_tokens.weight)  # no adapter there: untouched
    final = CoconutModel.from_pretrained(out / "final")
    assert not any("lora" in name for name, _ in final.named_parameters())
    assert not torch.equal(final.markers.bot, CoconutModel(base, tiny_tokenizer(), CoconutConfig(marker_init_text="---")).markers.bot)
