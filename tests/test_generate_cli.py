"""The ``quietstar generate`` command on a tiny saved model."""

from __future__ import annotations

import torch
from helpers import move_off_init, tiny_lm, tiny_tokenizer

from quietstar import QuietStarConfig, QuietStarModel
from quietstar.cli import main


def saved_model(tmp_path):
    torch.manual_seed(0)
    model = move_off_init(QuietStarModel(tiny_lm("llama"), tiny_tokenizer(), QuietStarConfig(thought_len=3)), head_scale=0.5)
    model.save_pretrained(tmp_path / "model")
    return model


def test_generate_without_thoughts_prints_the_base_models_greedy_completion(tmp_path, capsys):
    model = saved_model(tmp_path)
    assert main(["generate", "--model", str(tmp_path / "model"), "--no-thoughts", "--max-new-tokens", "6", "3 plus 4"]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if "Setting accelerator" not in line]
    ids = model.tokenizer("3 plus 4", return_tensors="pt", add_special_tokens=False)["input_ids"]
    expected = model.lm.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=model.tokenizer.eos_token_id)
    new = expected[0, ids.shape[1]:].tolist()
    if model.tokenizer.eos_token_id in new:
        new = new[: new.index(model.tokenizer.eos_token_id)]
    assert printed[0] == "3 plus 4" + model.tokenizer.decode(new)
    assert "tokens/s, without thoughts" in printed[-1]


def test_generate_shows_one_thought_per_new_token_for_a_batch(tmp_path, capsys):
    saved_model(tmp_path)
    assert main(["generate", "--model", str(tmp_path / "model"), "--show-thoughts", "--max-new-tokens", "4", "3 plus 4", "half of 8 is"]) == 0
    out = capsys.readouterr().out
    summary = out.strip().splitlines()[-1]
    assert "tokens/s, with thoughts (M=3)" in summary
    new_tokens = int(summary.split()[0])  # the tokens before each row's EOS
    assert new_tokens >= 1 and out.count("<sot>") == out.count("<eot>") == new_tokens


def test_generate_rejects_bad_arguments(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nowhere"), "hi"]) == 2
    assert "model directory not found" in capsys.readouterr().err
    saved_model(tmp_path)
    assert main(["generate", "--model", str(tmp_path / "model"), "--max-new-tokens", "0", "hi"]) == 2
    assert "--max-new-tokens" in capsys.readouterr().err
