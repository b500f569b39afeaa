"""The zero-shot eval: records and answer extraction, the probability metric against a hand computation, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import WORDS, independent_greedy_thought, move_off_init, sequence_hidden, tiny_lm
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from quietstar import QuietStarConfig, QuietStarModel, cli
from quietstar.evaluation.tasks import csqa_item, extract_answer, extract_choice, extract_number, gsm8k_item, normalize_number, read_jsonl
from quietstar.evaluation.zero_shot import gold_logprobs, main
from quietstar.quiet_star.generation import predict_continuation

# Records in the exact layouts of shared/data and of the hub datasets.
GSM8K_RECORD = {
    "question": "Janet\u2019s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her "
    "friends every day with four. She sells the remainder at the farmers' market daily for $2 per fresh duck egg. "
    "How much in dollars does she make every day at the farmers' market?",
    "answer": "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every day at the "
    "farmer\u2019s market.\n#### 18",
}
CSQA_ORIGINAL = {
    "answerKey": "A",
    "id": "1afa02df02c908a558b4036e80242fac",
    "question": {
        "question_concept": "revolving door",
        "choices": [{"label": "A", "text": "bank"}, {"label": "B", "text": "library"}, {"label": "C", "text": "department store"},
                    {"label": "D", "text": "mall"}, {"label": "E", "text": "new york"}],
        "stem": "A revolving door is convenient for two direction travel, but it also serves as a security measure at a what?",
    },
}
CSQA_HUB = {
    "id": "1afa02df02c908a558b4036e80242fac",
    "question": CSQA_ORIGINAL["question"]["stem"],
    "question_concept": "revolving door",
    "choices": {"label": ["A", "B", "C", "D", "E"], "text": ["bank", "library", "department store", "mall", "new york"]},
    "answerKey": "A",
}


# --- records and answer extraction ---------------------------------------------------------------------


def test_gsm8k_record_gives_the_prompt_and_the_gold_number():
    item = gsm8k_item(GSM8K_RECORD, "test line 1")
    assert item.gold == "18"
    assert item.prompt.startswith("Q: Janet\u2019s ducks") and item.prompt.endswith("farmers' market?\nA:")
    assert gsm8k_item({**GSM8K_RECORD, "answer": "... so $1,234.\n#### 1,234"}, "x").gold == "1234"
    assert gsm8k_item({**GSM8K_RECORD, "answer": "#### -3"}, "x").gold == "-3"


def test_csqa_original_and_hub_layouts_give_the_same_item():
    original, hub = csqa_item(CSQA_ORIGINAL, "x"), csqa_item(CSQA_HUB, "y")
    assert original.prompt == hub.prompt and original.gold == hub.gold == "A"
    assert original.prompt.splitlines() == [
        "Q: " + CSQA_HUB["question"], "Answer Choices:", "(A) bank", "(B) library", "(C) department store", "(D) mall",
        "(E) new york", "A:",
    ]


@pytest.mark.parametrize(
    "text, expected",
    [
        (" 18\nQ: next question", "18"),
        (" $18.", "18"),
        (" She makes 9 * 2 = $18 every day.", "18"),  # the last number of the answer line
        (" 16 x 3 = 48\n", "48"),
        (" 1,234 dollars", "1234"),
        (" $1,234.50 per day", "1234.5"),
        (" 18.00", "18"),
        (" -5 degrees", "-5"),
        (" \u22127", "-7"),
        (" 3, 4 and 5 are the sides", "5"),
        ("\n\n 42 apples", "42"),
        (" The answer is 12. Then 7 more", "12"),
        (" I do not know", None),
        ("", None),
    ],
)
def test_extract_number_direct_answers(text, expected):
    assert extract_number(text) == expected


def test_extract_number_chain_of_thought_takes_the_final_answer():
    chain = " She has 16 - 3 - 4 = 9 eggs. 9 * 2 = 18. The answer is $18.\nQ: another question with 5"
    assert extract_number(chain.split("\nQ:")[0], chain_of_thought=True) == "18"
    assert extract_number(" 16 - 3 - 4 = 9 eggs, so 9 * 2 = 18", chain_of_thought=True) == "18"
    assert normalize_number("1,000") == "1000" and normalize_number("0.50") == "0.5" and normalize_number("ten") is None


@pytest.mark.parametrize(
    "text, expected",
    [
        (" (B)\n", "B"),
        (" B) library", "B"),
        (" C", "C"),
        (" The answer is (D).", "D"),
        (" The answer is a bank.", "A"),  # "a" is an article, not a letter; the choice text decides
        (" library, since books", "B"),
        (" 1. 2. 3", None),
        ("", None),
    ],
)
def test_extract_choice(text, expected):
    item = csqa_item(CSQA_ORIGINAL, "x")
    assert extract_choice(text, item.labels, item.choices) == expected
    assert extract_answer(item, text) == expected


# --- a tiny model whose vocabulary has the letters ----------------------------------------------------

EVAL_WORDS = WORDS + ["A", "B", "C", "D", "E", "Q:", "A:", "(A)", "(B)", "(C)", "(D)", "(E)"]


def eval_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(EVAL_WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def eval_model(thought_len: int = 3) -> QuietStarModel:
    torch.manual_seed(3)
    lm = tiny_lm("llama", seed=3, vocab_size=len(EVAL_WORDS))
    return move_off_init(QuietStarModel(lm, eval_tokenizer(), QuietStarConfig(thought_len=thought_len)), head_scale=0.5).eval()


def gsm8k_records() -> list[dict]:
    return [{"question": "half of 8 plus 4 is", "answer": "x is 8 #### 8"},
            {"question": "the sum of 3 and 4", "answer": "#### 7"},
            {"question": "twice 2 is", "answer": "so 4\n#### 4"}]


def csqa_records() -> list[dict]:
    def record(stem, key):
        choices = [{"label": label, "text": text} for label, text in zip("ABCDE", ["sum", "half", "twice", "number", "x"])]
        return {"answerKey": key, "id": stem, "question": {"stem": stem, "choices": choices}}
    return [record("the sum of 3 and 4 is", "A"), record("half of 8", "B"), record("x plus y", "E")]


def talk_logprobs_by_hand(model, prefix: list[int], thought_of: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(base, talk) log-probs [V] of the token after ``prefix``, with the greedy thought (the one the model would
    think after ``thought_of``, when given), from the plain model."""
    embed, lm_head = model.lm.get_input_embeddings(), model.lm.get_output_embeddings()
    ids = torch.tensor(prefix)
    source = ids if thought_of is None else torch.tensor(thought_of)
    thought = independent_greedy_thought(model.lm, model.start_embedding, source, model.config.thought_len)
    h_base = sequence_hidden(model.lm, embed(ids))[-1]
    seq = torch.cat([embed(ids), model.start_embedding[None], embed(torch.tensor(thought)), model.end_embedding[None]])
    talk, _ = model.mixing_head(h_base, sequence_hidden(model.lm, seq)[-1])
    return lm_head(h_base).log_softmax(-1), lm_head(talk).log_softmax(-1)


@torch.no_grad()
def test_csqa_score_is_the_renormalised_letter_probability_computed_by_hand():
    model = eval_model()
    items = [csqa_item(r, f"line {i}") for i, r in enumerate(csqa_records())]
    scores = gold_logprobs(model, items, samples=2, greedy_thoughts=True)
    letters = [EVAL_WORDS.index(label) for label in "ABCDE"]
    for b, item in enumerate(items):
        base, talk = talk_logprobs_by_hand(model, model.tokenizer(item.prompt)["input_ids"])
        gold = "ABCDE".index(item.gold)
        for mode, lp in (("base", base), ("thoughts", talk)):
            probs = lp[letters].softmax(-1)
            assert float(scores[mode][b]) == pytest.approx(float(probs[gold].log()), rel=1e-5, abs=1e-5), (b, mode)
            assert bool(scores[f"{mode}_correct"][b]) == (int(probs.argmax()) == gold)
    assert not torch.allclose(scores["base"], scores["thoughts"])  # the live head makes the thought matter


@torch.no_grad()
def test_the_shuffled_control_scores_each_item_with_the_previous_items_thought_computed_by_hand():
    model = eval_model()
    items = [csqa_item(r, f"line {i}") for i, r in enumerate(csqa_records())]
    scores = gold_logprobs(model, items, samples=2, greedy_thoughts=True)
    letters = [EVAL_WORDS.index(label) for label in "ABCDE"]
    prompts = [model.tokenizer(item.prompt)["input_ids"] for item in items]
    for b, item in enumerate(items):
        _, talk = talk_logprobs_by_hand(model, prompts[b], thought_of=prompts[b - 1])  # item 0 gets the last item's
        probs = talk[letters].softmax(-1)
        assert float(scores["shuffled"][b]) == pytest.approx(float(probs["ABCDE".index(item.gold)].log()), rel=1e-5, abs=1e-5)
    assert not torch.allclose(scores["shuffled"], scores["thoughts"])


@torch.no_grad()
def test_gsm8k_score_is_the_answer_probability_with_a_thought_before_each_token_computed_by_hand():
    model = eval_model()
    items = [gsm8k_item(r, f"line {i}") for i, r in enumerate(gsm8k_records())]
    scores = gold_logprobs(model, items, samples=1, greedy_thoughts=True)
    for b, item in enumerate(items):
        prefix = model.tokenizer(item.prompt)["input_ids"]
        answer = model.tokenizer(" " + item.gold, add_special_tokens=False)["input_ids"]
        expected = {"base": 0.0, "thoughts": 0.0}
        for token in answer:
            base, talk = talk_logprobs_by_hand(model, prefix)
            expected["base"] += float(base[token])
            expected["thoughts"] += float(talk[token])
            prefix = prefix + [token]
        for mode in expected:
            assert float(scores[mode][b]) == pytest.approx(expected[mode], rel=1e-5, abs=1e-5), (b, mode)


@torch.no_grad()
def test_sampled_thought_scores_average_probabilities_over_draws():
    model = eval_model()
    items = [gsm8k_item(r, f"line {i}") for i, r in enumerate(gsm8k_records())]
    draws = [gold_logprobs(model, items, samples=1, generator=torch.Generator().manual_seed(s))["thoughts"] for s in range(2)]
    assert not torch.allclose(draws[0], draws[1])  # sampled thoughts differ between draws
    # Two draws per item in one call lay the rows out as [item 0, item 0, item 1, item 1, ...]; scoring that
    # list once each with the same seed gives the same thoughts, so the call must return log(mean(P over the pair)).
    both = gold_logprobs(model, items, samples=2, generator=torch.Generator().manual_seed(0))["thoughts"]
    doubled = [item for item in items for _ in range(2)]
    single = gold_logprobs(model, doubled, samples=1, generator=torch.Generator().manual_seed(0))["thoughts"].view(-1, 2)
    assert torch.allclose(both, single.exp().mean(dim=1).log(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(single[:, 0], single[:, 1])


@torch.no_grad()
def test_teacher_forced_talk_logprobs_equal_the_training_forward_given_the_same_thoughts():
    """The inference path (KV cache, one position at a time) against the token-parallel training forward."""
    model = eval_model()
    ids = torch.tensor([[20, 5, 7, 22, 9, 12, 6]])
    P = 4  # prompt = ids[:, :4], continuation = ids[:, 4:]
    pred = predict_continuation(model, ids[:, :P], None, ids[:, P:], generator=torch.Generator().manual_seed(1))
    cfg = model.config
    thoughts = torch.randint(3, 20, (1, ids.shape[1], cfg.n_thoughts, cfg.thought_len))
    for j in range(ids.shape[1] - P):
        thoughts[0, P - 1 + j, 0] = pred.thoughts[0, j]  # the thought after x_t predicts x_{t+1}
    out = model(ids, thoughts=thoughts)
    for j in range(ids.shape[1] - P):
        target = int(ids[0, P + j])
        assert float(pred.talk_logprobs[0, j, target]) == pytest.approx(float(out.talk_logprobs[0, P - 1 + j, 0, 0]), rel=1e-6, abs=1e-5)
        assert float(pred.base_logprobs[0, j, target]) == pytest.approx(float(out.base_logprobs[0, P - 1 + j, 0]), abs=1e-5)


@torch.no_grad()
def test_forced_thoughts_are_thought_as_given_and_score_as_the_training_forward():
    """``forced_thoughts`` replaces the sampled thought token for token; its talk log-probs equal the training forward's."""
    model = eval_model()
    ids = torch.tensor([[20, 5, 7, 22, 9, 12, 6], [8, 11, 4, 19, 13, 10, 21]])
    P, cfg = 4, model.config
    forced = torch.randint(3, 20, (2, ids.shape[1] - P, cfg.thought_len), generator=torch.Generator().manual_seed(3))
    pred = predict_continuation(model, ids[:, :P], None, ids[:, P:], forced_thoughts=forced)
    assert torch.equal(pred.thoughts, forced)
    thoughts = torch.randint(3, 20, (2, ids.shape[1], cfg.n_thoughts, cfg.thought_len))
    thoughts[:, P - 1:-1, 0] = forced
    out = model(ids, thoughts=thoughts)
    talk = pred.talk_logprobs.gather(-1, ids[:, P:, None])[..., 0]
    torch.testing.assert_close(talk, out.talk_logprobs[:, P - 1:-1, 0, 0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="forced_thoughts must be"):
        predict_continuation(model, ids[:, :P], None, ids[:, P:], forced_thoughts=forced[:, :1])


# --- the command -------------------------------------------------------------------------------------


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def saved_eval_model(tmp_path):
    model = eval_model()
    model.save_pretrained(tmp_path / "model")
    return model


@pytest.mark.parametrize("task", ["gsm8k", "csqa"])
def test_eval_cli_writes_the_contract_report(tmp_path, capsys, task):
    model = saved_eval_model(tmp_path)
    records = gsm8k_records() if task == "gsm8k" else csqa_records()
    data = write_jsonl(tmp_path / f"{task}.jsonl", records * 2)
    output = tmp_path / "out" / "report.json"
    args = ["--model", str(tmp_path / "model"), "--task", task, "--data-file", str(data), "--limit", "5", "--output", str(output),
            "--batch-size", "2", "--cot-samples", "2", "--cot-max-new-tokens", "6"]
    assert main(args) == 0
    report = json.loads(output.read_text())
    assert report["task"] == task and report["n"] == 5 and len(report["items"]) == 5
    for mode in ("base", "thoughts"):
        for key in ("score", "exact_match", "cot_majority"):
            assert 0.0 <= report[mode][key] <= 1.0, (mode, key)
    gains = [item["thoughts"]["gold_logprob"] - item["base"]["gold_logprob"] for item in report["items"]]
    assert report["paired"]["gold_logprob_gain"] == pytest.approx(sum(gains) / len(gains))
    over = [item["thoughts"]["gold_logprob"] - item["shuffled"]["gold_logprob"] for item in report["items"]]
    assert report["paired"]["gold_logprob_gain_over_shuffled"] == pytest.approx(sum(over) / len(over))
    assert 0.0 <= report["shuffled"]["score"] <= 1.0
    printed = capsys.readouterr().out
    assert "exact match (greedy)" in printed and "score (P of gold)" in printed and "thoughts - shuffled thoughts" in printed
    # the recorded base completion is transformers' greedy decoding of the prompt, up to the first newline/EOS
    first = read_jsonl(data, task, 1)[0]
    prompt = model.tokenizer(first.prompt, return_tensors="pt")["input_ids"]
    hf = model.lm.generate(prompt, max_new_tokens=report["settings"]["max_new_tokens"], do_sample=False,
                           eos_token_id=model.tokenizer.eos_token_id, pad_token_id=0)[0, prompt.shape[1]:].tolist()
    if model.tokenizer.eos_token_id in hf:
        hf = hf[: hf.index(model.tokenizer.eos_token_id)]
    assert report["items"][0]["base"]["completion"] == model.tokenizer.decode(hf, skip_special_tokens=True)


def test_the_quietstar_command_runs_eval_and_perplexity(tmp_path, capsys):
    saved_eval_model(tmp_path)
    data = write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k_records())
    assert cli.main(["eval", "--model", str(tmp_path / "model"), "--task", "gsm8k", "--data-file", str(data), "--limit", "2"]) == 0
    assert "gsm8k: 2 items" in capsys.readouterr().out
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "the sum of 3 and 4 is 7"}])
    assert cli.main(["perplexity", "--model", str(tmp_path / "model"), "--data-file", str(text), "--output-dir", str(tmp_path / "ppl")]) == 0
    assert (tmp_path / "ppl" / "report.json").is_file()
    assert cli.main(["eval", "--model", str(tmp_path / "model"), "--task", "gsm8k", "--data-file", str(data), "--batch-size", "0"]) == 2
    assert "quietstar eval: error: EvalConfig.batch_size: must be an integer >= 1, got 0" in capsys.readouterr().err


def test_an_untrained_mixing_head_gives_identical_base_and_thought_results(tmp_path):
    torch.manual_seed(0)
    plain = tiny_lm("llama", seed=4, vocab_size=len(EVAL_WORDS))
    plain.save_pretrained(tmp_path / "plain")
    eval_tokenizer().save_pretrained(tmp_path / "plain")
    data = write_jsonl(tmp_path / "csqa.jsonl", csqa_records())
    output = tmp_path / "report.json"
    assert main(["--model", str(tmp_path / "plain"), "--task", "csqa", "--data-file", str(data), "--output", str(output),
                 "--thought-len", "2"]) == 0
    report = json.loads(output.read_text())
    for key in ("exact_match", "choice_accuracy"):
        assert report["base"][key] == report["thoughts"][key], key
    for key in ("score", "gold_logprob"):  # equal up to float32 rounding between batch rows
        assert report["base"][key] == pytest.approx(report["thoughts"][key], rel=1e-6), key
    for item in report["items"]:
        assert item["base"]["completion"] == item["thoughts"]["completion"]


def test_malformed_records_fail_with_the_line_number(tmp_path, capsys):
    saved_eval_model(tmp_path)
    lines = [json.dumps(gsm8k_records()[0]), "", "{not json", json.dumps(gsm8k_records()[1])]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    base = ["--model", str(tmp_path / "model"), "--task", "gsm8k", "--data-file"]
    assert main(base + [str(bad)]) == 2
    assert "bad.jsonl line 3: not valid JSON" in capsys.readouterr().err
    write_jsonl(bad, [gsm8k_records()[0], {"question": "no answer"}])
    assert main(base + [str(bad)]) == 2
    assert "bad.jsonl line 2: GSM8K record needs an 'answer'" in capsys.readouterr().err
    write_jsonl(bad, [{**csqa_records()[0], "answerKey": "F"}])
    assert main(["--model", str(tmp_path / "model"), "--task", "csqa", "--data-file", str(bad)]) == 2
    assert "bad.jsonl line 1: 'answerKey' 'F' is not one of the choice labels" in capsys.readouterr().err
    assert main(base + [str(tmp_path / "missing.jsonl")]) == 2
    assert "eval data file not found" in capsys.readouterr().err
    assert main(base + [str(bad), "--task", "mmlu"]) == 2
    assert "EvalConfig.task: must be one of gsm8k, csqa" in capsys.readouterr().err


def test_an_evaluation_that_stops_resumes_to_the_uninterrupted_report(tmp_path, monkeypatch, capsys):
    """Stopped in its third batch, then rerun with --resume: the uninterrupted run's report, sampled thoughts and
    chains of thought included (each batch samples from its own seeded generator, whatever ran before it in the
    process); without --resume, or with other settings, the rerun is refused in one line."""
    import quietstar.evaluation.zero_shot as zero_shot
    from quietstar.evaluation.item_log import partial_path

    saved_eval_model(tmp_path)
    data = write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k_records() * 2)  # 6 items: 3 batches of 2
    whole, out = tmp_path / "whole.json", tmp_path / "report.json"
    args = ["--model", str(tmp_path / "model"), "--task", "gsm8k", "--data-file", str(data), "--batch-size", "2",
            "--cot-samples", "3", "--cot-max-new-tokens", "4"]
    assert main(args + ["--output", str(whole)]) == 0
    assert not partial_path(whole).exists()  # the log goes once the report is written

    calls, real = [], zero_shot.gold_logprobs

    def stops_in_the_third_batch(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a kill would stop it, after two finished batches
        return real(*a, **k)

    monkeypatch.setattr(zero_shot, "gold_logprobs", stops_in_the_third_batch)
    assert main(args + ["--output", str(out)]) == 130  # Ctrl-C: one line, the finished batches kept
    monkeypatch.setattr(zero_shot, "gold_logprobs", real)
    log = partial_path(out)
    assert len(log.read_text().splitlines()) == 1 + 4 and not out.exists()
    capsys.readouterr()
    assert main(args + ["--output", str(out)]) == 2  # before the model loads
    assert capsys.readouterr().err == (f"quietstar eval: error: {log} holds the items of an unfinished evaluation; "
                                       "pass --resume to continue it, or delete the file to start again\n")
    assert main(args + ["--output", str(out), "--resume", "--cot-temperature", "0.9"]) == 2
    assert capsys.readouterr().err == (f"quietstar eval: error: --resume: {log} was written with other settings: "
                                       "cot_temperature (then 0.7, now 0.9)\n")
    assert main(args + ["--resume"]) == 2
    assert "error: --resume continues from the items kept beside --output; give --output" in capsys.readouterr().err
    assert main(args + ["--output", str(out), "--resume"]) == 0
    resumed, expected = json.loads(out.read_text()), json.loads(whole.read_text())
    for report in (resumed, expected):  # what differs between any two runs: the timings and the output path
        del report["seconds"], report["settings"]["output"]
        for mode in ("base", "thoughts"):
            del report[mode]["generation_tokens_per_s"]
    assert resumed == expected and not log.exists()
    chains = {}  # the draws are samples: each question is asked twice, and its chains differ
    for item in expected["items"]:
        chains.setdefault(item["question"], []).append(item["thoughts"]["cot_chains"])
    assert all(first != second for first, second in chains.values())
