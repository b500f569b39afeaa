"""Fuzzed inputs for every data reader and settings file (hypothesis property tests).

Each reader is given files hypothesis makes: arbitrary bytes, valid JSON of the wrong type, records
with fields missing, of the wrong type or extra, empty files, blank lines, bad UTF-8, NUL bytes,
lone surrogate escapes, integers past Python's 4300-digit limit, nesting past the recursion limit
and megabyte lines. Every outcome must be a clean read, or the error a command prints as its one
line (an ``OSError`` or ``ValueError``, ``ConfigError`` for settings, whose message is one line and
names the file, line or field); never another exception (a traceback), a hang, or a count that
does not add up to the lines written.

The default profile is derandomized (the same examples on every run) and small enough for the
suite; ``QUIETSTAR_FUZZ=long`` selects the thorough one (random, thousands of examples per
property, a 20 s deadline per example); docs/contributing.md has its command and its last run's counts. No example database is
written (``database=None``); hypothesis keeps only its caches, in the git-ignored ``.hypothesis/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import io
import json
import os
import pickle
import time
import types
import typing
from pathlib import Path
from typing import Any

import pyarrow
import pyarrow.parquet
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from quietstar.coconut import prosqa
from quietstar.coconut.config import CoconutConfig, CoconutDataConfig
from quietstar.coconut.data import Example, read_examples
from quietstar.core.cli_config import ConfigError, build_config, load_yaml
from quietstar.core.files import json_lines
from quietstar.core.text_data import DataConfig, load_documents
from quietstar.evaluation import coconut as coconut_eval
from quietstar.evaluation.coconut_analysis import read_prosqa
from quietstar.evaluation.perplexity import ReportConfig, read_documents
from quietstar.evaluation.prosqa_paths import Graph
from quietstar.evaluation.tasks import csqa_item, gsm8k_item, read_jsonl
from quietstar.evaluation.zero_shot import EvalConfig
from quietstar.quiet_star.config import QuietStarConfig
from quietstar.testbed import config as testbed_config
from quietstar.training import coconut as coconut_recipe
from quietstar.training import pretrain
from quietstar.training.engine import parse_recipe_args
from quietstar.training.train_config import CoconutTrainConfig, TrainConfig, deepspeed_config, zero_stage

# The suite's profile has no deadline: hypothesis times an example by the wall clock, so a suite that is paused
# (SIGSTOP, a loaded machine) would fail one; its examples are small, and a hang would stop the suite. The long
# run gives each example 20 s, ample for what takes milliseconds.
settings.register_profile(
    "quietstar-fuzz", max_examples=20, derandomize=True, database=None, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "quietstar-fuzz-long", max_examples=2000, database=None, deadline=datetime.timedelta(seconds=20), print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
PROFILE = settings.get_profile("quietstar-fuzz-long" if os.environ.get("QUIETSTAR_FUZZ") == "long" else "quietstar-fuzz")

BOM = b"\xef\xbb\xbf"
# Lines that are not UTF-8 JSON, whatever a reader wants.
HOSTILE_LINES = [
    b"1" * 5000,  # an integer past Python's 4300-digit limit for int(str)
    b"[" * 100_000 + b"]" * 100_000,  # nesting past the recursion limit
    b"\x00", b"{\x00}", b'{"text": "a\x00b"}',  # NUL bytes, raw inside a string (a control character there)
    b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b'{"text": "caf\xe9"}',  # not UTF-8: a stray byte, overlong, an encoded surrogate
    b"\x0c", b"\xc2\xa0", b"\xe2\x80\xa8", b"\x1c",  # whitespace to Python's str.strip, not to JSON
    b"{", b'{"text": "unclosed', b'"\\ud800"',
]
NOT_RECORDS = [b"NaN", b"[]", b"null", b'"text"', BOM + b"[1, 2]", b'"\\ud83d\\ude00"']  # JSON, but no reader's record
# JSON fragments put in place of one string of an otherwise valid record: each makes the line malformed.
POISONS = ['"a\\ud800b"', '"\\udfff"', '{"x": "\\ud83d"}', "9" * 5000, "[" * 60_000 + "]" * 60_000]
SENTINEL = "@@poison@@"
BLANK_LINES = [b"", b" ", b"\t\r", BOM, BOM + b"  "]

JSON_SCALARS = st.none() | st.booleans() | st.integers(-(10**30), 10**30) | st.floats(allow_nan=False) | st.text(max_size=12)
JSON_VALUES = st.recursive(
    JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
EXTRA_FIELDS = st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=3)
MEGABYTE_TEXT = "the sum " * 131_072


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """One directory for the module; each example overwrites its files there."""
    return tmp_path_factory.mktemp("fuzz")


# --- lines and their expected fate -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Line:
    """One line of a generated jsonl file: its bytes (no newline) and what a reader must make of it.

    ``kind`` is ``blank`` (neither a record nor counted), ``malformed``, or the reader's own kind of
    good record; ``value`` is what the reader must read from a good one. ``json``: whether the line
    is UTF-8 JSON (None: arbitrary bytes, which may or may not be).
    """

    raw: bytes
    kind: str
    value: Any = None
    json: bool | None = True

    def __repr__(self) -> str:  # a megabyte line would make hypothesis' report of a failing example unreadable
        raw = self.raw if len(self.raw) <= 80 else self.raw[:80] + b"... (%d bytes)" % len(self.raw)
        value = repr(self.value) if len(repr(self.value)) <= 80 else repr(self.value)[:80] + "..."
        return f"Line({raw!r}, {self.kind!r}, {value}, json={self.json})"


def dumped(record: Any, ascii_only: bool) -> bytes:
    return json.dumps(record, ensure_ascii=ascii_only).encode()


@st.composite
def lines_of(draw, good: st.SearchStrategy[tuple[dict, str, Any]], malformed: st.SearchStrategy[Any]) -> Line:
    """A line: a good record (``good`` draws (record, kind, value)), that record poisoned, a malformed record
    (drawn from ``malformed``), a hostile line, arbitrary bytes, or a blank line."""
    choice = draw(st.sampled_from(["good", "good", "poisoned", "malformed", "hostile", "bytes", "blank"]))
    if choice in ("good", "poisoned"):
        record, kind, value = draw(good)
        strings = [key for key, item in record.items() if isinstance(item, str)]
        if choice == "good" or not strings:
            return Line(dumped(record, draw(st.booleans())), kind, value)
        poisoned = {**record, draw(st.sampled_from(strings)): SENTINEL}
        raw = json.dumps(poisoned).replace(json.dumps(SENTINEL), draw(st.sampled_from(POISONS)))
        return Line(raw.encode(), "malformed", json=False)
    if choice == "malformed":
        return Line(dumped(draw(malformed), draw(st.booleans())), "malformed")
    if choice == "hostile":
        if draw(st.booleans()):
            return Line(draw(st.sampled_from(NOT_RECORDS)), "malformed")
        return Line(draw(st.sampled_from(HOSTILE_LINES)), "malformed", json=False)
    if choice == "bytes":
        raw = draw(st.binary(max_size=40)).replace(b"\n", b"")
        return Line(raw, "blank" if raw.removeprefix(BOM).strip(b" \t\r") == b"" else "malformed", json=None)
    return Line(draw(st.sampled_from(BLANK_LINES)), "blank")


def write(path: Path, lines: list[Line], final_newline: bool = True) -> Path:
    path.write_bytes(b"\n".join(line.raw for line in lines) + (b"\n" if final_newline and lines else b""))
    return path


def non_blank(lines: list[Line]) -> list[tuple[int, Line]]:
    """(line number, line) of the lines a reader must report."""
    return [(number, line) for number, line in enumerate(lines, start=1) if line.kind != "blank"]


def assert_one_line(error: BaseException, *prefixes: str) -> None:
    """A clean failure: its message is one line and starts with one of ``prefixes``."""
    message = str(error)
    assert len(message.splitlines()) == 1, message[:500]
    assert message.startswith(prefixes), message[:500]


# --- core.files.json_lines: the line reader under every jsonl reader ---------------------------------------

ANY_RECORD = st.tuples(st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=4), st.just("good"), st.none())
ANY_LINE = lines_of(ANY_RECORD, JSON_VALUES)


@PROFILE
@given(lines=st.lists(ANY_LINE, max_size=12), final_newline=st.booleans())
def test_json_lines_reports_every_non_blank_line_once(workdir, lines, final_newline):
    path = write(workdir / "lines.jsonl", lines, final_newline)
    reported = list(json_lines(path))
    expected = non_blank(lines)
    assert [number for number, _, _ in reported] == [number for number, _ in expected]
    for (number, value, problem), (_, line) in zip(reported, expected):
        if problem is None:  # compared as JSON text: NaN is not equal to itself
            assert line.json is not False and json.dumps(value) == json.dumps(json.loads(line.raw.decode("utf-8-sig")))
        else:
            assert line.json is not True and value is None and len(problem.splitlines()) == 1
            assert problem.startswith(("not UTF-8", "not valid JSON")), problem


@PROFILE
@given(value=JSON_VALUES, ascii_only=st.booleans())
def test_json_lines_round_trips_any_json_value(workdir, value, ascii_only):
    path = workdir / "value.jsonl"
    path.write_bytes(dumped(value, ascii_only) + b"\n")
    assert list(json_lines(path)) == [(1, value, None)]


# --- the training corpus: jsonl, txt and parquet through load_documents ------------------------------------


@st.composite
def text_records(draw, field: str = "text") -> tuple[dict, str, str]:
    """A record with a string text field (and extra fields): ``good`` if the text is not blank, else ``empty``."""
    text = draw(st.text(max_size=30) | st.sampled_from(["", " \n\t", "\u2003", MEGABYTE_TEXT]))
    record = {**draw(EXTRA_FIELDS), field: text}
    return record, "good" if text.strip() else "empty", text


def wrong_text_records(field: str = "text") -> st.SearchStrategy[Any]:
    """Records without a string text field, and JSON values that are not records."""
    wrong_type = JSON_VALUES.filter(lambda value: not isinstance(value, str))
    return (st.builds(lambda extra, value: {**extra, field: value}, EXTRA_FIELDS, wrong_type)
            | EXTRA_FIELDS.filter(lambda record: field not in record)
            | JSON_VALUES.filter(lambda value: not isinstance(value, dict)))


def assert_documents(config: DataConfig, expected: list[str | None]) -> None:
    """``load_documents`` gives the ``expected`` texts (None: malformed) in order, or, when none is usable,
    fails naming the dataset with the counts of what it skipped."""
    good = sum(text is not None and text.strip() != "" for text in expected)
    malformed = sum(text is None for text in expected)
    try:
        documents = load_documents(config)
    except ValueError as error:
        event("a one-line error")
        assert good == 0, error
        assert_one_line(error, f"DataConfig.dataset: no usable document in {config.dataset!r}: {len(expected)} records, "
                               f"{len(expected) - malformed} empty, {malformed} malformed (")
    else:
        event("a clean read")
        assert good > 0 and documents["text"] == expected


@PROFILE
@given(lines=st.lists(lines_of(text_records(), wrong_text_records()), max_size=10))
def test_training_jsonl_reads_every_record_or_counts_it_skipped(workdir, lines):
    path = write(workdir / "corpus.jsonl", lines)
    expected = [line.value if line.kind in ("good", "empty") else None for _, line in non_blank(lines)]
    assert_documents(DataConfig(dataset=str(path)), expected)


@PROFILE
@given(lines=st.lists(lines_of(text_records("body"), wrong_text_records("body")), max_size=6))
def test_training_jsonl_with_another_text_field(workdir, lines):
    path = write(workdir / "corpus.json", lines)
    expected = [line.value if line.kind in ("good", "empty") else None for _, line in non_blank(lines)]
    assert_documents(DataConfig(dataset=str(path), text_field="body"), expected)


@PROFILE
@given(content=st.binary(max_size=200) | st.text(max_size=60).map(str.encode) | st.sampled_from(HOSTILE_LINES + BLANK_LINES))
def test_a_txt_file_is_one_document_or_one_malformed_record(workdir, content):
    path = workdir / "document.txt"
    path.write_bytes(content)
    try:
        text: str | None = content.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = None
    assert_documents(DataConfig(dataset=str(path)), [text])


PARQUET_COLUMNS = {
    "string": (pyarrow.string(), st.none() | st.text(max_size=20) | st.just("  ")),
    "large_string": (pyarrow.large_string(), st.text(max_size=20)),
    "int64": (pyarrow.int64(), st.none() | st.integers(-(2**63), 2**63 - 1)),
    "float64": (pyarrow.float64(), st.floats()),
    "binary": (pyarrow.binary(), st.binary(max_size=10)),
    "list<string>": (pyarrow.list_(pyarrow.string()), st.lists(st.text(max_size=5), max_size=3)),
    "bool": (pyarrow.bool_(), st.booleans()),
}


@PROFILE
@given(column=st.sampled_from(sorted(PARQUET_COLUMNS)), data=st.data(), extra=st.booleans(), dictionary=st.booleans())
def test_parquet_text_columns_of_any_type(workdir, column, data, extra, dictionary):
    arrow_type, values = PARQUET_COLUMNS[column]
    rows = data.draw(st.lists(values, max_size=8))
    array = pyarrow.array(rows, type=arrow_type)
    if dictionary and column == "string":
        array = array.dictionary_encode()
    columns = {"text": array, **({"id": pyarrow.array(range(len(rows)))} if extra else {})}
    path = workdir / "corpus.parquet"
    pyarrow.parquet.write_table(pyarrow.table(columns), path)
    assert_documents(DataConfig(dataset=str(path)), [row if isinstance(row, str) else None for row in rows])


@pytest.fixture(scope="module")
def valid_parquet(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("parquet") / "valid.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"text": ["the sum", "of two", None], "id": [1, 2, 3]}), path)
    return path.read_bytes()


@PROFILE
@given(data=st.data())
def test_parquet_files_that_are_damaged_or_not_parquet(workdir, valid_parquet, data):
    damage = data.draw(st.sampled_from(["bytes", "truncated", "flipped"]))
    if damage == "bytes":
        content = data.draw(st.binary(max_size=300))
    elif damage == "truncated":
        content = valid_parquet[: data.draw(st.integers(0, len(valid_parquet) - 1))]
    else:
        content = bytearray(valid_parquet)
        for position in data.draw(st.lists(st.integers(0, len(content) - 1), min_size=1, max_size=4)):
            content[position] ^= data.draw(st.integers(1, 255))
        content = bytes(content)
    path = workdir / "damaged.parquet"
    path.write_bytes(content)
    try:
        documents = load_documents(DataConfig(dataset=str(path)))
    except ValueError as error:
        event("a one-line error")
        assert_one_line(error, "DataConfig.")
    else:
        event("a clean read")
        assert all(text is None or isinstance(text, str) for text in documents["text"])


# --- Coconut's examples (converted GSM8K / ProntoQA / ProsQA records, raw GSM8K) ----------------------------

STEP_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="<>#\n"), max_size=12)


@st.composite
def coconut_records(draw) -> tuple[dict, str, Example]:
    """A converted ``{question, steps, answer}`` record with extra fields, or a raw GSM8K one; and its Example."""
    question = draw(st.text(max_size=20))
    if draw(st.booleans()):
        steps, answer = draw(st.lists(st.text(max_size=12), max_size=4)), draw(st.text(max_size=8))
        extra = {k: v for k, v in draw(EXTRA_FIELDS).items() if k not in ("question", "steps", "answer")}
        return {**extra, "question": question, "steps": steps, "answer": answer}, "good", Example(question, tuple(steps), answer)
    annotations = draw(st.lists(STEP_TEXT.map(lambda expr: f"<<{expr}>>"), max_size=3))
    reasoning = "".join(draw(STEP_TEXT) + annotation for annotation in annotations) + draw(STEP_TEXT)
    final = draw(st.text(st.characters(codec="utf-8", exclude_characters="#"), min_size=1, max_size=10))
    answer = final.strip().replace(",", "")
    record = {"question": question, "answer": f"{reasoning}#### {final}"}
    return record, ("good" if answer else "malformed"), Example(question, tuple(annotations), answer)


MALFORMED_COCONUT = (
    JSON_VALUES.filter(lambda value: not isinstance(value, dict))
    | st.fixed_dictionaries({"question": JSON_VALUES, "steps": JSON_VALUES.filter(lambda v: not isinstance(v, list)),
                             "answer": JSON_VALUES.filter(lambda v: not isinstance(v, str) or "####" not in v)})
    | st.fixed_dictionaries({"question": st.text(max_size=5), "answer": STEP_TEXT,
                             "steps": st.lists(JSON_SCALARS.filter(lambda v: not isinstance(v, str)), min_size=1, max_size=3)})
    | st.fixed_dictionaries({"question": JSON_VALUES.filter(lambda v: not isinstance(v, str)), "answer": st.just("#### 4")})
    | st.fixed_dictionaries({"answer": st.text(st.characters(codec="utf-8", exclude_characters="#"), max_size=10)})
    | EXTRA_FIELDS.filter(lambda record: "answer" not in record or "question" not in record)
)


@PROFILE
@given(lines=st.lists(lines_of(coconut_records(), MALFORMED_COCONUT), max_size=10))
def test_coconut_examples_are_read_or_counted_skipped(workdir, lines):
    path = write(workdir / "examples.jsonl", lines)
    expected = [line.value for _, line in non_blank(lines) if line.kind == "good"]
    skipped = sum(line.kind == "malformed" for line in lines)
    try:
        examples, skipped_read = read_examples(path)
    except ValueError as error:
        event("a one-line error")
        assert not expected
        assert_one_line(error, f"no examples in {path}: ")
    else:
        event("a clean read")
        assert examples == expected and skipped_read == skipped


@PROFILE
@given(lines=st.lists(lines_of(coconut_records(), MALFORMED_COCONUT), max_size=8), task=st.sampled_from(coconut_eval.TASKS))
def test_coconut_eval_files_read_whole_or_fail_at_the_first_bad_line(workdir, lines, task):
    path = write(workdir / "eval.jsonl", lines)
    gsm8k_only = [line for line in lines if line.kind == "good" and "steps" not in json.loads(line.raw)]
    first_bad = next((number for number, line in non_blank(lines) if line.kind == "malformed"
                      or (task != "gsm8k" and line in gsm8k_only)), None)
    try:
        examples = coconut_eval.read_task(path, task)
    except ValueError as error:
        event("a one-line error")
        assert_one_line(error, f"{path} line {first_bad}: " if first_bad else f"{path}: no records")
    else:
        event("a clean read")
        assert first_bad is None and examples == [line.value for _, line in non_blank(lines)]


# --- ProsQA files with their graphs (coconut-analyze, prosqa stats) ----------------------------------------

PROSQA_ITEMS = prosqa.generate(4, seed=0)


@st.composite
def prosqa_records(draw) -> tuple[dict, str, dict]:
    """A generated ProsQA record, kept whole (``good``) or with a field removed or set to any JSON value
    (``maybe``: whether that still makes a usable record depends on the value)."""
    record = dict(draw(st.sampled_from(PROSQA_ITEMS)))
    change = draw(st.sampled_from(["none", "none", "none", "drop", "replace", "edge"]))
    if change == "none":
        return record, "good", record
    key = draw(st.sampled_from(sorted(record)))
    if change == "drop":
        del record[key]
    elif change == "replace":
        record[key] = draw(JSON_VALUES | st.integers(-3, 40))
    else:
        record["edges"] = [*record["edges"], draw(st.lists(JSON_SCALARS | st.integers(-3, 40), max_size=3))]
    return record, "maybe", record


def is_node(value: Any, names: list) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names)


def assert_prosqa_record(record: dict) -> None:
    """A record read as usable: its texts are strings and its graph's nodes are indices of its names."""
    assert isinstance(record["question"], str) and isinstance(record["answer"], str)
    assert isinstance(record["steps"], list) and all(isinstance(step, str) for step in record["steps"])
    names = record["idx_to_symbol"]
    assert isinstance(names, list) and all(isinstance(name, str) for name in names)
    assert all(isinstance(edge, list) and len(edge) == 2 and all(is_node(n, names) for n in edge) for edge in record["edges"])
    assert all(is_node(record[key], names) for key in ("root", "target", "neg_target"))
    Graph.of_item(record)


@PROFILE
@given(lines=st.lists(lines_of(prosqa_records(), JSON_VALUES), max_size=6))
def test_prosqa_files_read_whole_or_fail_naming_the_line(workdir, lines):
    path = write(workdir / "prosqa.jsonl", lines)
    try:
        items = read_prosqa(path)
    except ValueError as error:
        event("a one-line error")
        assert_one_line(error, f"{path} line ", f"{path}: no records")
    else:
        event("a clean read")
        assert len(items) == len(non_blank(lines))
        for item in items:
            assert_prosqa_record(item)


@PROFILE
@given(lines=st.lists(lines_of(prosqa_records(), JSON_VALUES), max_size=6))
def test_prosqa_stats_prints_a_table_or_one_error_line(workdir, lines):
    path = write(workdir / "stats.jsonl", lines)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = prosqa.main(["stats", str(path)])
    event("a clean read" if status == 0 else "a one-line error")
    if status == 0:
        assert out.getvalue().startswith("statistic") and all(line.kind != "malformed" for line in lines)
        for _, line in non_blank(lines):
            assert_prosqa_record(json.loads(line.raw))
    else:
        assert status == 2 and len(err.getvalue().splitlines()) == 1
        assert err.getvalue().startswith(f"{prosqa.PROG}: error: "), err.getvalue()


# --- the zero-shot eval files: GSM8K and CommonsenseQA -----------------------------------------------------

DIGITS = st.text("0123456789", min_size=1, max_size=6000)


@st.composite
def gsm8k_records(draw) -> tuple[dict, str, str]:
    """A GSM8K record whose answer ends in ``#### <number>`` (with thousands commas, sign or decimals), and its gold."""
    question = draw(st.text(max_size=20).filter(str.strip))
    integer, fraction = draw(DIGITS), draw(st.none() | st.text("0123456789", min_size=1, max_size=4))
    number = integer + (f".{fraction}" if fraction else "")
    gold = (integer.lstrip("0") or "0") if not fraction or not fraction.strip("0") else \
        f"{integer.lstrip('0') or '0'}.{fraction.rstrip('0')}"
    record = {**draw(EXTRA_FIELDS), "question": question, "answer": f"{draw(st.text(max_size=20))}#### {number}"}
    return record, "good", gold


@st.composite
def csqa_records(draw) -> tuple[dict, str, str]:
    """A CommonsenseQA record in the original or the hub layout, and its answer key."""
    labels = draw(st.lists(st.sampled_from("ABCDEFGHIJ"), min_size=2, max_size=5, unique=True))
    texts = draw(st.lists(st.text(min_size=1, max_size=8), min_size=len(labels), max_size=len(labels)))
    stem, key = draw(st.text(max_size=20).filter(str.strip)), draw(st.sampled_from(labels))
    if draw(st.booleans()):
        question = {"stem": stem, "choices": [{"label": label, "text": text} for label, text in zip(labels, texts)]}
        return {"answerKey": key, "question": question}, "good", key
    return {"answerKey": key, "question": stem, "choices": {"label": labels, "text": texts}}, "good", key


EVAL_RECORDS = {"gsm8k": (gsm8k_records(), gsm8k_item), "csqa": (csqa_records(), csqa_item)}


@PROFILE
@given(task=st.sampled_from(sorted(EVAL_RECORDS)), data=st.data())
def test_eval_records_of_any_shape_give_an_item_or_fail_naming_the_record(task, data):
    records, make_item = EVAL_RECORDS[task]
    shape = data.draw(st.sampled_from(["any JSON", "valid", "mutated"]))
    record = data.draw(JSON_VALUES) if shape == "any JSON" else data.draw(records)[0]
    if shape == "mutated":
        record = mutated(record, data)
    try:
        item = make_item(record, "f.jsonl line 3")
    except ValueError as error:
        event("a one-line error")
        assert_one_line(error, "f.jsonl line 3: ")
    else:
        event("a clean read")
        assert isinstance(item.gold, str) and item.gold and item.prompt.endswith("A:")


def mutated(record: dict, data: st.DataObject) -> dict:
    """``record`` with one field, or one field of a nested object, removed or set to any JSON value."""
    record = json.loads(json.dumps(record))
    target = record
    if isinstance(record.get("question"), dict) and data.draw(st.booleans()):
        target = record["question"]
    key = data.draw(st.sampled_from(sorted(target)))
    if data.draw(st.booleans()):
        del target[key]
    else:
        target[key] = data.draw(JSON_VALUES)
    return record


@PROFILE
@given(task=st.sampled_from(sorted(EVAL_RECORDS)), data=st.data(), limit=st.none() | st.integers(1, 4))
def test_eval_files_give_their_items_or_fail_at_the_first_bad_line(workdir, task, data, limit):
    records, _ = EVAL_RECORDS[task]
    lines = data.draw(st.lists(lines_of(records, JSON_VALUES.filter(lambda value: not isinstance(value, dict))), max_size=8))
    path = write(workdir / "eval.jsonl", lines)
    expected, first_bad = [], None
    for number, line in non_blank(lines):
        if limit is not None and len(expected) >= limit:
            break
        if line.kind == "malformed":
            first_bad = number
            break
        expected.append(line.value)
    try:
        items = read_jsonl(path, task, limit)
    except ValueError as error:
        event("a one-line error")
        assert_one_line(error, f"{path.name} line {first_bad}: " if first_bad else f"{path}: no {task} records")
    else:
        event("a clean read")
        assert first_bad is None and [item.gold for item in items] == expected


# --- the perplexity report's data file --------------------------------------------------------------------


@PROFILE
@given(lines=st.lists(lines_of(text_records(), wrong_text_records()), max_size=8), max_documents=st.none() | st.integers(1, 3))
def test_perplexity_documents_read_whole_or_fail_naming_the_line(workdir, lines, max_documents):
    path = write(workdir / "heldout.jsonl", lines)
    expected, first_bad = [], None
    for number, line in non_blank(lines):
        if line.kind == "malformed":
            first_bad = number
            break
        expected.append(line.value)
        if len(expected) == max_documents:
            break
    try:
        documents = read_documents(path, "text", max_documents)
    except ValueError as error:
        event("a one-line error")
        assert_one_line(error, f"{path} line {first_bad}: ")
    else:
        event("a clean read")
        assert first_bad is None and documents == expected


@PROFILE
@given(content=st.binary(max_size=200) | st.text(max_size=60).map(str.encode) | st.sampled_from(HOSTILE_LINES))
def test_perplexity_txt_file_is_its_text_or_not_utf8(workdir, content):
    path = workdir / "heldout.txt"
    path.write_bytes(content)
    try:
        documents = read_documents(path, "text")
    except ValueError as error:
        event("a one-line error")
        assert_one_line(error, f"{path}: not UTF-8 (")
        with pytest.raises(UnicodeDecodeError):
            content.decode("utf-8")
    else:
        event("a clean read")
        assert documents == [content.decode("utf-8-sig")]


# --- settings files: YAML for every config class, and the DeepSpeed JSON -----------------------------------

CONFIG_CLASSES = [QuietStarConfig, DataConfig, TrainConfig, CoconutConfig, CoconutDataConfig, CoconutTrainConfig, EvalConfig,
                  ReportConfig, testbed_config.TestbedConfig, prosqa.Settings]
# Fields without a valid default: the commands take them from flags.
REQUIRED = {EvalConfig: {"task": "gsm8k"}, ReportConfig: {"model": "m", "data_file": "test.jsonl", "output_dir": "report"}}
# Text fields that also take an integer, as its digits: YAML reads "seeds: 7" as a number.
DIGITS_AS_TEXT = {(testbed_config.TestbedConfig, "seeds")}
HOSTILE_YAML = [
    b"a: 2001-02-30\n", b"a: " + b"1" * 5000 + b"\n", b"a: 0x" + b"f" * 5000 + b"\n", b"[" * 5000 + b"]" * 5000,
    b"a: !!timestamp foo\n", b"a: !!int x\n", b"a: !!float [1]\n", b"a: !!binary '!!'\n", b"a: !!python/object:os.system {}\n",
    b"? [a, b]\n: 1\n", b"a: &x [*x]\n", b"a: *missing\n", b"\x00", b"\xff\xfe", b"a: 1\n---\nb: 2\n", b"'",
]
# Strings that some field takes (a choice, a list of rows or seeds), and some that look like another type.
FIELD_STRINGS = st.sampled_from([
    "auto", "pack", "crop", "coconut", "cot", "stage", "epoch", "efficient", "token", "reference", "cpu", "cuda:0", "gsm8k",
    "csqa", "prosqa-mini", "valid", "1,2,3", "delimiters", "cot,no_cot", "cosine", "constant", "bf16", "fp32", "true", "null",
    "1e-4", "",
])
YAML_SCALARS = JSON_SCALARS | st.floats() | st.dates() | st.integers(-(10**40), 10**40) | FIELD_STRINGS
YAML_VALUES = st.recursive(
    YAML_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def of_type(hint: Any, value: Any) -> bool:
    """Whether ``value`` fits a config field annotated ``hint``: ``X | None`` takes None; a float field takes
    any finite number; an int field an int (not a bool)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None:
            return True
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < float("inf")
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def well_typed(cls: type, config: object) -> None:
    """Every field of a config that was built holds a value of its annotated type."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        assert of_type(hints[field.name], getattr(config, field.name)), (field.name, getattr(config, field.name))


def typed_value(hint: Any) -> st.SearchStrategy[Any]:
    """Values of a config field's annotated type, in and out of the field's range."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return st.none() | typed_value(next(arg for arg in typing.get_args(hint) if arg is not type(None)))
    return {bool: st.booleans(), int: st.integers(-2, 300), float: st.floats(-1.0, 1e3) | st.sampled_from([1e-4, 0.5, 1.0])}.get(
        hint, FIELD_STRINGS | st.text(max_size=8))


def field_hints(*classes: type) -> dict[str, Any]:
    """The annotated type of every field of ``classes`` (a recipe's configs: their field names are unique across them)."""
    return {field.name: typing.get_type_hints(cls)[field.name] for cls in classes for field in dataclasses.fields(cls)}


@st.composite
def field_values(draw, hints: dict[str, Any], unknown: st.SearchStrategy[Any] = st.nothing()) -> dict[Any, Any]:
    """Up to four of the fields of ``hints`` (or keys drawn from ``unknown``), each with a value of the field's type or any
    YAML value."""
    keys = draw(st.lists(st.sampled_from(sorted(hints)) | unknown, max_size=4, unique=True))
    return {key: draw((typed_value(hints[key]) if key in hints else st.nothing()) | YAML_VALUES) for key in keys}


def yaml_file(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


@PROFILE
@given(cls=st.sampled_from(CONFIG_CLASSES), data=st.data())
def test_yaml_values_build_a_well_typed_config_or_fail_naming_a_field(workdir, cls, data):
    values = load_yaml(yaml_file(workdir / "config.yaml", {**REQUIRED.get(cls, {}), **data.draw(field_values(field_hints(cls)))}))
    try:
        config = build_config(cls, values)
    except ConfigError as error:
        event("a one-line error")
        assert_one_line(error, *(f"{cls.__name__}.{field.name}" for field in dataclasses.fields(cls)))
    else:
        event("a clean read")
        well_typed(cls, config)


@PROFILE
@given(cls=st.sampled_from(CONFIG_CLASSES), data=st.data())
def test_a_value_of_the_wrong_type_is_refused_by_its_field_name(cls, data):
    hints = typing.get_type_hints(cls)
    field = data.draw(st.sampled_from([f.name for f in dataclasses.fields(cls)]))
    taken = (lambda v: of_type(int, v)) if (cls, field) in DIGITS_AS_TEXT else (lambda v: False)
    value = data.draw(YAML_VALUES.filter(lambda v: not of_type(hints[field], v) and not taken(v)))
    with pytest.raises(ConfigError) as refused:
        build_config(cls, {**REQUIRED.get(cls, {}), field: value})
    assert_one_line(refused.value, f"{cls.__name__}.{field}")


@PROFILE
@given(content=st.binary(max_size=120) | st.text(max_size=80).map(str.encode) | st.sampled_from(HOSTILE_YAML))
def test_any_yaml_file_reads_as_a_mapping_or_fails_in_one_line(workdir, content):
    path = workdir / "any.yaml"
    path.write_bytes(content)
    try:
        values = load_yaml(path)
    except ConfigError as error:
        event("a one-line error")
        assert_one_line(error, str(path))
    else:  # what PyYAML reads there: a mapping, or nothing at all (an empty file, only comments); compared pickled,
        event("a clean read")  # as an alias can make a list that holds itself, and NaN is not equal to itself
        parsed = yaml.safe_load(content)
        assert parsed is None and values == {} or pickle.dumps(parsed) == pickle.dumps(values)


def test_a_yaml_alias_bomb_fails_fast_in_one_short_line(workdir):
    """Nine levels of nine aliases: PyYAML shares the lists, so it reads at once, but the value's repr would be 9**9 items."""
    levels = ["a0: &a0 [" + ", ".join(["x"] * 9) + "]"]
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    path = workdir / "bomb.yaml"
    path.write_text("\n".join(levels) + "\nlr: *a8\n")
    started = time.process_time()  # CPU time: a pause of the process does not count
    with pytest.raises(ConfigError) as refused:
        build_config(TrainConfig, load_yaml(path))
    assert time.process_time() - started < 5
    assert_one_line(refused.value, "TrainConfig.lr: must be a finite number > 0, got [[[")
    assert len(str(refused.value)) < 2000


def test_a_hexadecimal_integer_past_the_decimal_digit_limit_is_refused_by_name(workdir):
    """YAML reads 0x... at any length (no decimal conversion), but such an int has no decimal repr for the message."""
    path = workdir / "hex.yaml"
    path.write_text("hops: 0x" + "f" * 5000 + "\n")
    with pytest.raises(ConfigError) as refused:
        build_config(testbed_config.TestbedConfig, load_yaml(path))
    assert_one_line(refused.value, "TestbedConfig.hops: must be an integer in 1..")
    assert str(refused.value).endswith("got <an integer of 5000 hexadecimal digits>")


RECIPES = {"pretrain": pretrain.CONFIGS, "coconut": coconut_recipe.CONFIGS}
UNKNOWN_KEYS = st.text(max_size=10) | st.integers() | st.booleans() | st.none()


@PROFILE
@given(recipe=st.sampled_from(sorted(RECIPES)), data=st.data())
def test_a_recipe_config_file_of_any_keys_and_values(workdir, recipe, data):
    configs = RECIPES[recipe]
    values = data.draw(field_values(field_hints(*configs), unknown=UNKNOWN_KEYS))
    path = yaml_file(workdir / "recipe.yaml", values)
    try:
        _, *built = parse_recipe_args("recipe", "fuzz", configs, ["--config", str(path)])
    except ConfigError as error:
        event("a one-line error")
        fields = [f"{cls.__name__}.{field.name}" for cls in configs for field in dataclasses.fields(cls)]
        assert_one_line(error, "config file: unknown field(s) ", *fields)
    else:
        event("a clean read")
        for cls, config in zip(configs, built):
            well_typed(cls, config)


@PROFILE
@given(settings_values=field_values(field_hints(prosqa.Settings), unknown=st.text(max_size=6)))
def test_prosqa_generator_settings_of_any_value(settings_values):
    try:
        made = prosqa.make_settings(**settings_values)
    except ValueError as error:
        event("a one-line error")
        assert_one_line(error, "unknown ProsQA setting(s) ", "Settings.")
    else:
        event("a clean read")
        well_typed(prosqa.Settings, made)


ANY_SECTION = JSON_VALUES | st.just("auto")
DEEPSPEED_SECTIONS = st.fixed_dictionaries({}, optional={
    "optimizer": ANY_SECTION | st.fixed_dictionaries({"type": st.sampled_from(["AdamW", "adamw", "Adam"]) | JSON_SCALARS},
                                                     optional={"params": ANY_SECTION | st.fixed_dictionaries({}, optional={
                                                         "lr": st.just(1e-6) | ANY_SECTION, "weight_decay": ANY_SECTION})}),
    "zero_optimization": ANY_SECTION | st.fixed_dictionaries({}, optional={
        "stage": st.integers(-1, 4) | ANY_SECTION, "offload_optimizer": ANY_SECTION | st.just({"device": "cpu"})}),
    **{key: ANY_SECTION for key in ("fp16", "bf16", "scheduler", "train_batch_size", "gradient_clipping",
                                    "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")},
})


@PROFILE
@given(content=st.binary(max_size=80) | st.sampled_from(HOSTILE_LINES) | DEEPSPEED_SECTIONS.map(lambda d: json.dumps(d).encode())
       | JSON_VALUES.map(lambda v: json.dumps(v).encode()), device=st.sampled_from(["cpu", "cuda"]))
def test_any_deepspeed_json_completes_or_fails_naming_the_file(workdir, content, device):
    path = workdir / "ds.json"
    path.write_bytes(content)
    train = TrainConfig(deepspeed=str(path))
    try:
        ds = deepspeed_config(train, device, world_size=2)
    except ConfigError as error:
        event("a one-line error")
        assert_one_line(error, f"TrainConfig.deepspeed: {path}", str(path))
    else:
        event("a clean read")
        assert ds["train_batch_size"] == 2 * train.micro_batch_size * train.grad_accum_steps
        assert zero_stage(ds) in (0, 1, 2, 3)


def test_the_profiles_are_registered_and_write_no_example_database():
    for name in ("quietstar-fuzz", "quietstar-fuzz-long"):
        assert settings.get_profile(name).database is None
    suite = settings.get_profile("quietstar-fuzz")
    assert suite.derandomize and suite.deadline is None  # the same examples on every run, and no wall-clock limit to trip
