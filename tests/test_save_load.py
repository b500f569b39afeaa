"""save_pretrained / from_pretrained round trip, and loading the base weights with stock transformers."""

import json

import pytest
import torch
from helpers import padded_batch, tiny_lm, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from quietstar import QuietStarConfig, QuietStarModel


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_round_trip_gives_identical_outputs(tmp_path, family):
    torch.manual_seed(0)
    model = QuietStarModel(tiny_lm(family), tiny_tokenizer(), QuietStarConfig(thought_len=3, n_true=2, policy_temperature=3.0))
    with torch.no_grad():  # trained-looking extras, so a reload that re-initialised them would show
        for p in list(model.mixing_head.parameters()) + [model.start_embedding, model.end_embedding]:
            p.normal_()
    model.save_pretrained(tmp_path)
    loaded = QuietStarModel.from_pretrained(tmp_path)

    assert loaded.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    ids, mask = padded_batch()
    a = model(ids, mask, generator=torch.Generator().manual_seed(0))
    b = loaded(ids, mask, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.thoughts, b.thoughts)
    for name in ("loss", "talk_logprobs", "base_logprobs", "rewards", "mixing_weights"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_base_weights_load_with_stock_transformers(tmp_path):
    model = QuietStarModel(tiny_lm("mistral"), tiny_tokenizer(), QuietStarConfig())
    model.save_pretrained(tmp_path)
    assert "quietstar" not in (tmp_path / "config.json").read_text()  # the attention dispatcher is not saved
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert plain.config._attn_implementation == "sdpa"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    ids, mask = padded_batch()
    assert torch.equal(plain(input_ids=ids, attention_mask=mask).logits, model.lm(input_ids=ids, attention_mask=mask).logits)
    assert tokenizer("the sum of 2 and 3").input_ids == model.tokenizer("the sum of 2 and 3").input_ids
    meta = json.loads((tmp_path / "quietstar_config.json").read_text())
    assert meta["method"] == "quietstar" and meta["format_version"] == 2 and meta["config"]["thought_len"] == 12
    assert (meta["config"]["loss_reduction"], meta["config"]["mixing_head_layers"]) == ("token", 1)


def test_loading_a_directory_that_is_not_a_checkpoint_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a saved QuietStarModel"):
        QuietStarModel.from_pretrained(tmp_path)
