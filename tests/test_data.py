"""The training data pipeline: sources, skipping and counting bad records, packing/cropping, order, shards, resume."""

import json

import pytest
import torch
from helpers import WORDS, tiny_tokenizer

from quietstar import ConfigError
from quietstar.core.text_data import DataConfig, TokenStream, heldout_batches, load_documents, split_heldout


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def corpus(tmp_path, n=40):
    """n documents of 6-17 words over the tiny vocabulary, plus bad records of every kind."""
    words = WORDS[4:]
    docs = [  # distinct: each starts with the two digits of its index
        {"text": f"{i // 10} {i % 10} " + " ".join(words[(i * 7 + j) % len(words)] for j in range(4 + i % 12)), "id": i}
        for i in range(n)
    ]
    bad = ["{not json", json.dumps([1, 2]), json.dumps({"body": "no text field"}), json.dumps({"text": 5}), json.dumps({"text": "   "}), json.dumps({"text": "x"})]
    return write_jsonl(tmp_path / "docs.jsonl", docs[:10] + bad + docs[10:])


def stream(path, seed=0, rank=0, world=1, **config):
    cfg = DataConfig(dataset=str(path), heldout_documents=0, **config)
    return TokenStream(load_documents(cfg), tiny_tokenizer(), cfg, seed=seed, rank=rank, world_size=world)


def take(it, n):
    return [next(it) for _ in range(n)]


def test_packing_gives_full_windows_of_the_concatenated_documents(tmp_path):
    s = stream(corpus(tmp_path), seq_len=8, min_tokens=2)
    seqs = take(iter(s), 30)
    assert all(x.shape == (8,) and x.dtype == torch.long for x in seqs)
    eos = tiny_tokenizer().eos_token_id
    assert sum(int((x == eos).sum()) for x in seqs) >= 20  # documents end with EOS inside the windows


def test_cropping_takes_one_window_per_long_enough_document(tmp_path):
    s = stream(corpus(tmp_path), seq_len=10, packing="crop")
    seqs = take(iter(s), 20)
    assert all(x.shape == (10,) for x in seqs)
    # documents of < 10 tokens (with EOS) were skipped as too short, once per epoch
    assert s.stats.skipped_short > 0 and s.stats.documents >= 20


def test_bad_records_are_skipped_and_counted(tmp_path):
    s = stream(corpus(tmp_path), seq_len=8, min_tokens=3)
    it = iter(s)
    take(it, 5)
    while s.state.epoch == 0:  # finish the first epoch
        next(it)
    # every record of epoch 0 is counted once, plus the first record read of epoch 1
    stats = s.stats
    assert stats.documents + stats.skipped_malformed + stats.skipped_empty + stats.skipped_short == 46 + 1
    assert stats.skipped_malformed >= 4  # bad JSON, a list, no "text", a non-string text
    assert stats.skipped_empty >= 1
    assert stats.skipped_short >= 1  # "x" + EOS is 2 tokens < 3
    assert stats.documents >= 40


def test_order_is_deterministic_for_a_seed_and_changes_with_it(tmp_path):
    path = corpus(tmp_path)
    a, b, c = (take(iter(stream(path, seed=s, seq_len=8)), 12) for s in (0, 0, 1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_each_rank_reads_different_documents(tmp_path):
    path = corpus(tmp_path)
    per_rank = [stream(path, rank=r, world=2, seq_len=6) for r in range(2)]
    for epoch in (0, 1):
        texts = [[record["text"] for record in s._epoch_documents(epoch)] for s in per_rank]
        assert len(texts[0]) == len(texts[1]) == 23
        real = [{t for t in rank_texts if t and t.strip()} for rank_texts in texts]  # malformed records are None
        assert real[0] and real[1] and not real[0] & real[1]
        assert len(real[0]) + len(real[1]) == 41  # the 40 documents and "x": nothing lost
    first = [take(iter(s), 5) for s in per_rank]
    assert not any(torch.equal(x, y) for x, y in zip(*first))


@pytest.mark.parametrize("packing", ["pack", "crop"])
def test_resume_continues_exactly(tmp_path, packing):
    path = corpus(tmp_path)
    full = take(iter(stream(path, seed=3, seq_len=7, packing=packing)), 60)
    first = stream(path, seed=3, seq_len=7, packing=packing)
    it = iter(first)
    head = take(it, 23)
    saved = json.loads(json.dumps(first.state_dict()))  # it must survive JSON
    resumed = stream(path, seed=3, seq_len=7, packing=packing)
    resumed.load_state_dict(saved)
    tail = take(iter(resumed), 37)
    assert all(torch.equal(x, y) for x, y in zip(head + tail, full))


def test_batches_and_heldout(tmp_path):
    cfg = DataConfig(dataset=str(corpus(tmp_path)), heldout_documents=5, seq_len=8)
    train, heldout = split_heldout(load_documents(cfg), cfg.heldout_documents)
    assert len(heldout) == 5 and len(train) == 46 - 5
    batch = next(TokenStream(train, tiny_tokenizer(), cfg, seed=0).batches(4))
    assert batch.shape == (4, 8)
    held = heldout_batches(heldout, tiny_tokenizer(), seq_len=8, batch_size=2)
    assert [ids.shape[0] for ids, _ in held] == [2, 2, 1]
    for ids, mask in held:
        assert mask.shape == ids.shape and bool(mask[:, 0].all())


def test_missing_files_and_bad_config_fail_with_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="DataConfig.dataset: no file matches"):
        load_documents(DataConfig(dataset=str(tmp_path / "nope.jsonl")))
    with pytest.raises(ConfigError, match="DataConfig.packing"):
        DataConfig(packing="shuffle")
    with pytest.raises(ConfigError, match="DataConfig.seq_len"):
        DataConfig(seq_len=1)


def test_a_corpus_too_small_for_one_sequence_fails_clearly(tmp_path):
    path = write_jsonl(tmp_path / "tiny.jsonl", [{"text": "the sum"}])
    with pytest.raises(ValueError, match="too little training text"):
        next(iter(stream(path, seq_len=50, packing="crop")))


def test_the_offline_default_corpus_loads():
    documents = load_documents(DataConfig())
    assert len(documents) == 270
    assert all(isinstance(r["text"], str) and len(r["text"]) > 20 for r in documents.select(range(5)))
