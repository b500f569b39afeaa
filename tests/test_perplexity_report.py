"""The perplexity report (``python -m quietstar.evaluation.perplexity``) on a tiny saved model."""

from __future__ import annotations

import html
import json
import math
import random
from html.parser import HTMLParser

import matplotlib.image
import pytest
import torch
import torch.nn.functional as F
from helpers import WORDS, move_off_init, tiny_lm, tiny_tokenizer

from quietstar import QuietStarConfig, QuietStarModel
from quietstar.evaluation.item_log import batch_generator, partial_path
from quietstar.evaluation.perplexity import (
    TokenScores,
    Window,
    difficulty_bins,
    heldout_nll,
    main,
    make_windows,
    shuffle_thoughts,
    summary,
)
from quietstar.evaluation.reports import write_html

SEQ_LEN, BATCH_SIZE, SEED = 16, 3, 5


def documents() -> list[str]:
    """Documents of several lengths (so windows are cut and batches padded); '<' and '&' are unknown words."""
    rng = random.Random(0)
    words = WORDS[4:] + ["<", "&"]
    return [" ".join(rng.choice(words) for _ in range(n)) for n in (40, 7, 1, 25)]


class Page(HTMLParser):
    """Collects the attributes of every ``<span class="tok">`` and counts opened and closed divs."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens: list[dict[str, str | None]] = []
        self.divs = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "span" and attrs.get("class") == "tok":
            self.tokens.append(attrs)
        self.divs += tag == "div"

    def handle_endtag(self, tag):
        self.divs -= tag == "div"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Run the CLI once: (model, output dir, report.json)."""
    root = tmp_path_factory.mktemp("perplexity")
    torch.manual_seed(0)
    model = move_off_init(QuietStarModel(tiny_lm("llama"), tiny_tokenizer(), QuietStarConfig(thought_len=3)), head_scale=0.5)
    model.save_pretrained(root / "model")
    data = root / "held&out.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents()))
    argv = ["--model", str(root / "model"), "--data-file", str(data), "--output-dir", str(root / "out"),
            "--seq-len", str(SEQ_LEN), "--batch-size", str(BATCH_SIZE), "--seed", str(SEED)]
    assert main(argv) == 0
    return model, root / "out", json.loads((root / "out" / "report.json").read_text())


def windows(tokenizer) -> list[torch.Tensor]:
    """The scored windows, cut independently of the module: [n] token ids each."""
    out = []
    for text in documents():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        out += [torch.tensor(ids[i : i + SEQ_LEN]) for i in range(0, len(ids), SEQ_LEN) if len(ids[i : i + SEQ_LEN]) >= 2]
    return out


def window_batches(tokenizer) -> list[tuple[list[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]:
    """The windows in batches of BATCH_SIZE, as the CLI scores them: (the windows, (ids, mask) right padded)."""
    rows, out = windows(tokenizer), []
    for start in range(0, len(rows), BATCH_SIZE):
        batch = rows[start : start + BATCH_SIZE]
        ids = torch.zeros(len(batch), max(len(r) for r in batch), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(batch):
            ids[i, : len(row)], mask[i, : len(row)] = row, 1
        out.append((batch, (ids, mask)))
    return out


def forwards(model, generator_of) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(talk NLLs [n-1], thoughts [n-1, R, M], shuffled-thought talk NLLs [n-1]) per window; ``generator_of(s)`` samples
    the batch whose first window is number s."""
    out = []
    for number, (batch, (ids, mask)) in enumerate(window_batches(model.tokenizer)):
        generator = generator_of(number * BATCH_SIZE)
        with torch.no_grad():
            result = model(ids, mask, generator=generator)
            _, talk, valid = result.next_token_nlls()
            moved = shuffle_thoughts(result.thoughts, valid, generator)
            _, shuffled, _ = model(ids, mask, thoughts=moved).next_token_nlls()
        out += [(talk[i, : len(row) - 1], result.thoughts[i, : len(row) - 1], shuffled[i, : len(row) - 1]) for i, row in enumerate(batch)]
    return out


@pytest.fixture(scope="module")
def seeded_forwards(report) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The report's forwards: each batch from its own generator, seeded with SEED and its first window's number."""
    return forwards(report[0], lambda start: batch_generator(SEED, start))


@pytest.fixture(scope="module")
def one_stream_forwards(report) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The held-out evaluation's forwards: every batch from one generator seeded with SEED."""
    generator = torch.Generator().manual_seed(SEED)
    return forwards(report[0], lambda start: generator)


def test_cli_writes_the_three_files_with_the_report_contract(report):
    _, out_dir, data = report
    assert {p.name for p in out_dir.iterdir()} == {"report.json", "difficulty.png", "tokens.html"}
    for key in ("base_nll", "talk_nll", "base_ppl", "talk_ppl", "mean_improvement", "improved_fraction"):
        assert math.isfinite(data[key]), key
    assert data["tokens"] == sum(len(w) - 1 for w in windows(tiny_tokenizer()))
    assert data["documents"] == 3 and data["windows"] == len(windows(tiny_tokenizer()))  # the 1-word document has no target
    assert 0.0 <= data["improved_fraction"] <= 1.0
    assert data["mean_improvement"] == pytest.approx(data["base_nll"] - data["talk_nll"])
    assert data["base_ppl"] == pytest.approx(math.exp(data["base_nll"]))
    assert sum(b["count"] for b in data["bins"]) == data["tokens"]
    assert [b["lo"] for b in data["bins"]][:2] == [0.0, 0.5] and data["bins"][-1]["hi"] is None
    assert data["settings"]["seq_len"] == SEQ_LEN and data["settings"]["thought_len"] == 3


def test_heldout_nll_gives_the_paired_talk_minus_shuffled_difference_and_its_standard_error(report, one_stream_forwards):
    """The recipes' held-out numbers on the same seeded batches: the mean of talk - shuffled over tokens, and its SE."""
    model = report[0]
    batches = [tensors for _, tensors in window_batches(model.tokenizer)]
    values = heldout_nll(model, batches, torch.device("cpu"), seed=SEED)
    differences = torch.cat([talk - shuffled for talk, _, shuffled in one_stream_forwards]).double()
    assert values["tokens"] == len(differences)
    assert values["talk_minus_shuffled"] == pytest.approx(float(differences.mean()), abs=1e-5)  # float32 forwards
    assert values["talk_minus_shuffled_se"] == pytest.approx(float(differences.std() / math.sqrt(len(differences))), rel=1e-4)
    assert values["talk_minus_shuffled"] == pytest.approx(values["talk_nll"] - values["shuffled_talk_nll"], abs=1e-7)


def test_base_nll_is_the_plain_lms_cross_entropy_over_all_windows(report):
    model, _, data = report
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in windows(model.tokenizer):
            logits = model.lm(ids[None]).logits[0, :-1]
            total += float(F.cross_entropy(logits, ids[1:], reduction="sum"))
            count += len(ids) - 1
    assert data["base_nll"] == pytest.approx(total / count, abs=1e-5)


def test_talk_nll_is_the_mean_of_next_token_nlls_of_the_seeded_forwards(report, seeded_forwards):
    _, _, data = report
    talk = torch.cat([t for t, _, _ in seeded_forwards])
    assert data["talk_nll"] == pytest.approx(float(talk.double().mean()), abs=1e-5)
    assert data["talk_nll"] != pytest.approx(data["base_nll"], abs=1e-3)  # the perturbed mixing head makes thoughts matter


def test_shuffled_control_is_the_talk_nll_with_moved_thoughts(report, seeded_forwards):
    _, _, data = report
    shuffled = torch.cat([s for _, _, s in seeded_forwards])
    assert data["shuffled_talk_nll"] == pytest.approx(float(shuffled.double().mean()), abs=1e-5)
    assert data["shuffled_talk_nll"] != pytest.approx(data["talk_nll"], abs=1e-4)  # the trained-looking head reads the thought
    assert data["shuffled_improvement"] == pytest.approx(data["base_nll"] - data["shuffled_talk_nll"])
    assert 0.0 <= data["own_beats_shuffled_fraction"] <= 1.0
    for b in data["bins"]:
        if b["count"]:
            assert math.isfinite(b["shuffled_talk_nll"]) and math.isfinite(b["shuffled_improvement"])


def test_shuffle_moves_every_valid_position_and_keeps_the_rest():
    thoughts = torch.arange(2 * 5 * 2 * 3).view(2, 5, 2, 3)
    valid = torch.tensor([[True, True, True, True, False], [True, True, False, False, False]])
    moved = shuffle_thoughts(thoughts, valid, torch.Generator().manual_seed(0))
    assert torch.equal(moved[~valid], thoughts[~valid])
    assert all(not torch.equal(moved[b, t], thoughts[b, t]) for b, t in valid.nonzero().tolist())
    # A permutation of the valid positions' (R, M) thoughts: the same multiset, each kept whole.
    key = lambda x: sorted(tuple(row.flatten().tolist()) for row in x)  # noqa: E731
    assert key(moved[valid]) == key(thoughts[valid])
    single = torch.zeros(1, 3, dtype=torch.bool)
    single[0, 1] = True
    assert torch.equal(shuffle_thoughts(thoughts[:1, :3], single), thoughts[:1, :3])


def test_a_report_that_stops_resumes_to_the_uninterrupted_report(report, tmp_path, monkeypatch, capsys):
    """Stopped in its third batch, with the second batch's last line lost (a kill while it was written), then rerun
    with --resume: report.json equal to the uninterrupted run's bit for bit (its seconds aside), and the same
    tokens.html; without --resume, or with other settings, the rerun is refused in one line."""
    import quietstar.evaluation.perplexity as perplexity

    root = report[1].parent
    argv = ["--model", str(root / "model"), "--data-file", str(root / "held&out.jsonl"), "--seq-len", str(SEQ_LEN),
            "--batch-size", "2", "--seed", str(SEED)]  # 6 windows: 3 batches
    whole, out = tmp_path / "whole", tmp_path / "out"
    assert main(argv + ["--output-dir", str(whole)]) == 0
    assert not partial_path(whole / "report.json").exists()  # the log goes once the report is written

    calls, real = [], perplexity.token_nlls

    def stops_in_the_third_batch(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a kill would stop it, after two finished batches
        return real(*a, **k)

    monkeypatch.setattr(perplexity, "token_nlls", stops_in_the_third_batch)
    assert main(argv + ["--output-dir", str(out)]) == 130  # Ctrl-C: one line, the finished batches kept
    monkeypatch.setattr(perplexity, "token_nlls", real)
    log = partial_path(out / "report.json")
    lines = log.read_text().splitlines()
    assert len(lines) == 1 + 4 and not (out / "report.json").exists()
    log.write_text("\n".join(lines[:-1]) + "\n")  # the second batch half written: it is scored again, as a batch
    capsys.readouterr()
    assert main(argv + ["--output-dir", str(out)]) == 2  # the last line of stderr, after the model's loading bar
    assert capsys.readouterr().err.endswith(f"\nquietstar perplexity: error: {log} holds the items of an unfinished evaluation; "
                                            "pass --resume to continue it, or delete the file to start again\n")
    assert main(argv + ["--output-dir", str(out), "--resume", "--seed", "6"]) == 2
    assert capsys.readouterr().err.endswith(f"\nquietstar perplexity: error: --resume: {log} was written with other settings: "
                                            "seed (then 5, now 6)\n")
    assert main(argv + ["--output-dir", str(out), "--resume"]) == 0
    resumed, expected = (json.loads((d / "report.json").read_text()) for d in (out, whole))
    assert resumed.pop("seconds") > 0 and expected.pop("seconds") > 0
    assert resumed == expected and not log.exists()
    assert (out / "tokens.html").read_text() == (whole / "tokens.html").read_text()
    assert {p.name for p in out.iterdir()} == {"report.json", "difficulty.png", "tokens.html"}


def test_difficulty_png_is_a_readable_png(report):
    _, out_dir, _ = report
    path = out_dir / "difficulty.png"
    assert path.read_bytes().startswith(b"\x89PNG")
    assert matplotlib.image.imread(path).ndim == 3


def test_tokens_html_colours_every_scored_token_and_escapes_text_and_thoughts(report, seeded_forwards):
    model, out_dir, data = report
    page = (out_dir / "tokens.html").read_text()
    parser = Page()
    parser.feed(page)
    assert len(parser.tokens) == data["tokens"] and parser.divs == 0
    assert all("background-color" in t["style"] and "base NLL" in t["title"] for t in parser.tokens)
    assert "&lt;unk&gt;" in page and "<unk>" not in page  # '<' and '&' are unknown words, decoded as <unk>
    assert "held&amp;out.jsonl" in page and "Showing the first" not in page
    thoughts = [model.tokenizer.decode(z.tolist()).replace("\n", "\\n") for _, zs, _ in seeded_forwards for z in zs[:, 0]]
    assert [t["title"].splitlines()[-1] for t in parser.tokens] == [f"thought before it: <sot>{z}<eot>" for z in thoughts]
    assert html.escape(f"<sot>{thoughts[0]}<eot>") in page


def test_tokens_html_is_capped_by_html_tokens(tmp_path):
    tokenizer = tiny_tokenizer()
    cut = [Window(0, [4, 5, 6, 7]), Window(0, [8, 9, 10]), Window(1, [11, 12, 13])]
    scores = TokenScores(
        base=[torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 0.2]), torch.tensor([4.0, 1.0])],
        talk=[torch.tensor([0.5, 2.5, 3.0]), torch.tensor([0.4, 0.1]), torch.tensor([3.0, 2.0])],
        shuffled=[torch.tensor([0.6, 2.5, 3.1]), torch.tensor([0.5, 0.1]), torch.tensor([3.0, 2.1])],
        thoughts=[torch.full((3, 2), 14), torch.full((2, 2), 15), torch.full((2, 2), 16)],
    )
    report = {"model": "m<1>", "data_file": "d.txt", "documents": 2, "windows": 3, **summary(*scores.flat())}
    write_html(tmp_path / "tokens.html", report, cut, scores, tokenizer, cap=4)
    page = (tmp_path / "tokens.html").read_text()
    parser = Page()
    parser.feed(page)
    assert len(parser.tokens) == 4 and parser.divs == 0
    assert "Showing the first 4 of 7 scored tokens" in page and "m&lt;1&gt;" in page
    assert "document 2" not in page  # the cap ends inside the first document


def test_difficulty_bins_are_half_open_and_keep_empty_bins():
    base = torch.tensor([0.0, 0.49, 0.5, 2.5, 9.0])
    talk = torch.tensor([0.1, 0.29, 0.5, 2.0, 10.0])
    shuffled = torch.tensor([0.2, 0.29, 0.4, 2.5, 10.0])
    bins = difficulty_bins(base, talk, shuffled, edges=(0.0, 0.5, 1.0, 2.0, math.inf))
    assert [(b["lo"], b["hi"], b["count"]) for b in bins] == [(0.0, 0.5, 2), (0.5, 1.0, 1), (1.0, 2.0, 0), (2.0, None, 2)]
    assert bins[0]["mean_improvement"] == pytest.approx(0.05) and bins[0]["improved_fraction"] == 0.5
    assert bins[1]["improved_fraction"] == 0.0  # talk == base is not an improvement
    assert bins[2]["base_nll"] is None and bins[2]["improved_fraction"] is None
    assert bins[3]["talk_nll"] == pytest.approx(6.0) and bins[3]["mean_improvement"] == pytest.approx(-0.25)
    assert bins[0]["shuffled_improvement"] == pytest.approx(0.0, abs=1e-7) and bins[0]["own_beats_shuffled_fraction"] == 0.5
    assert bins[1]["shuffled_talk_nll"] == pytest.approx(0.4) and bins[3]["own_beats_shuffled_fraction"] == 0.5


def test_make_windows_cuts_documents_and_stops_at_max_tokens():
    docs = [list(range(10)), [1], list(range(5))]
    assert [(w.document, w.ids) for w in make_windows(docs, 4, 100)] == [
        (0, [0, 1, 2, 3]), (0, [4, 5, 6, 7]), (0, [8, 9]), (2, [0, 1, 2, 3])
    ]  # the 1-token windows (document 1, and the tail [4] of document 2) are dropped
    cut = make_windows(docs, 4, 5)
    assert [w.ids for w in cut] == [[0, 1, 2, 3], [4, 5, 6]] and sum(len(w.ids) - 1 for w in cut) == 5


@pytest.mark.parametrize(
    "line, problem",
    [("{not json", "not valid JSON (Expecting property name enclosed in double quotes at column 2)"),
     ('["a list"]', "not a JSON object"), ('{"body": "the sum"}', "no string 'text' field")],
)
def test_a_malformed_jsonl_line_exits_2_naming_the_line(tmp_path, capsys, line, problem):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "the sum"}\n\n' + line + "\n")
    assert main(["--model", str(tmp_path / "model"), "--data-file", str(data), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"quietstar perplexity: error: {data} line 3: {problem}"


def test_bad_settings_exit_2(tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_text("the sum")
    argv = ["--model", str(tmp_path / "model"), "--data-file", str(data), "--output-dir", str(tmp_path), "--seq-len", "1"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == "quietstar perplexity: error: ReportConfig.seq_len: must be an integer >= 2, got 1"
    assert main(["--data-file", str(data), "--output-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "quietstar perplexity: error: ReportConfig.model: is required, got ''"


def test_missing_file_unsupported_suffix_and_no_text_exit_2(report, tmp_path, capsys):
    model_dir = str(report[1].parent / "model")

    def run(data) -> str:
        assert main(["--model", model_dir, "--data-file", str(data), "--output-dir", str(tmp_path / "out")]) == 2
        return capsys.readouterr().err

    assert f"data file not found: {tmp_path / 'nope.txt'}" in run(tmp_path / "nope.txt")
    (tmp_path / "data.csv").write_text("a,b\n")
    assert "unsupported data file type '.csv'" in run(tmp_path / "data.csv")
    (tmp_path / "one.txt").write_text("sum\n")
    assert "no text to score" in run(tmp_path / "one.txt")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("size", [0, -1, "2", True])
def test_a_kept_items_file_with_a_bad_batch_size_is_refused_in_one_line_not_a_hang(tmp_path, size):
    from quietstar.evaluation.item_log import ItemLog

    out = tmp_path / "report.json"
    settings = {"seed": 1}
    lines = [{"settings": settings}, {"item": {"question": "q0"}, "seconds": 0.1, "batch": size}]
    partial_path(out).write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(ValueError, match="not a partial evaluation .a batch size is not a positive integer"):
        ItemLog(out, settings, ["q0", "q1"], resume=True)
