"""Training text: load documents, tokenize, pack or crop to ``seq_len``, shard, resume.

Sources (``DataConfig.dataset``):
    "champ"                      the offline default: the 270 competition-math problems
                                 and solutions of the ``champ-dataset`` package
    local files                  ``.jsonl``/``.json`` (one object per line), ``.parquet``,
                                 ``.txt`` (one document per file); globs and several paths
                                 separated by commas; the text is ``DataConfig.text_field``
    a hub name                   e.g. ``open-web-math/open-web-math``, streamed with ``datasets``

The stream is deterministic for a seed: documents are shuffled per epoch with
``seed + epoch``, split between ranks by ``datasets.distributed.split_dataset_by_node``
(each rank reads different documents), tokenized with an EOS after each, and
either packed into back-to-back ``seq_len`` windows or cropped to one random
window per document (the paper's "random crops"). ``TokenStream.state_dict()``
holds the exact position (epoch, document, leftover tokens), so a resumed run
yields the same sequences as an uninterrupted one.

Records that are malformed (not UTF-8, not JSON, not an object, no string text
field; a ``.txt`` file that is not UTF-8), empty, or too short are skipped and
counted in ``TokenStream.stats``; they never stop a run. What cannot work fails at
start-up, the same on every rank, with a one-line error: a missing, unreadable or
directory path, an unreachable/unknown dataset, a parquet file that is damaged or
not parquet, a parquet file or hub dataset without the text column, local files
without one usable document, held-out documents that leave none to train on
(``split_heldout``), and training documents too few or too short for one sequence
per rank (``TokenStream``).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow
import pyarrow.parquet
import torch
from datasets import Dataset, IterableDataset, load_dataset
from datasets.distributed import split_dataset_by_node

from quietstar.core import offline
from quietstar.core.cli_config import is_int, one_line, require
from quietstar.core.files import input_file, json_lines, read_utf8

CHAMP = "champ"
PACKING = ("pack", "crop")


@dataclass(frozen=True)
class DataConfig:
    """Where the training text comes from and how it is cut.

    Attributes:
        dataset: ``champ`` (offline default), local file path(s)/globs separated
            by commas, or a hub dataset name (streamed).
        text_field: the field holding the text in jsonl/parquet/hub records.
        seq_len: tokens per training sequence (the paper: 256).
        packing: ``pack`` (concatenate documents, cut back-to-back windows) or
            ``crop`` (one random window per document; shorter documents are skipped).
        min_tokens: documents with fewer tokens are skipped as too short.
        heldout_documents: documents set aside (before sharding) for held-out NLL.
        hub_split: split to stream from a hub dataset.
    """

    dataset: str = CHAMP
    text_field: str = "text"
    seq_len: int = 256
    packing: str = "pack"
    min_tokens: int = 8
    heldout_documents: int = 16
    hub_split: str = "train"

    def __post_init__(self) -> None:
        require(isinstance(self.dataset, str) and self.dataset.strip() != "", self, "dataset", "must be a non-empty string")
        require(isinstance(self.text_field, str) and self.text_field != "", self, "text_field", "must be a non-empty string")
        require(is_int(self.seq_len) and self.seq_len >= 2, self, "seq_len", "must be an integer >= 2")
        require(self.packing in PACKING, self, "packing", f"must be one of {', '.join(PACKING)}")
        require(is_int(self.min_tokens) and self.min_tokens >= 1, self, "min_tokens", "must be an integer >= 1")
        require(is_int(self.heldout_documents) and self.heldout_documents >= 0, self, "heldout_documents", "must be an integer >= 0")
        require(isinstance(self.hub_split, str) and self.hub_split != "", self, "hub_split", "must be a non-empty string")


@dataclass
class StreamStats:
    """Counts of what the stream read and skipped (per rank)."""

    documents: int = 0
    sequences: int = 0
    skipped_empty: int = 0
    skipped_short: int = 0
    skipped_malformed: int = 0


# --- documents ------------------------------------------------------------------------------------------


def champ_documents() -> list[dict[str, str]]:
    """The champ-dataset problems, each with its solution steps, as ``{"text": ...}`` records."""
    spec = importlib.util.find_spec("champ_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the offline corpus needs the champ-dataset package: pip install --no-deps champ-dataset==1.0.0")
    path = Path(spec.submodule_search_locations[0]) / "dataset_files" / "v0.json"
    problems = json.loads(path.read_text())["problems"].values()
    return [
        {"text": "\n".join([p["_text"]] + [step["_text"] for step in p["solution"]["steps"]])}
        for p in sorted(problems, key=lambda p: p["identifier"])
    ]


def _local_paths(spec: str) -> list[Path] | None:
    """The files named by ``spec`` (comma-separated paths or globs), or None when it names none locally."""
    parts = [part.strip() for part in spec.split(",") if part.strip()]
    looks_local = any(part.startswith((".", "/", "~")) or Path(part).suffix in (".jsonl", ".json", ".parquet", ".txt") for part in parts)
    if not looks_local:
        return None
    paths: list[Path] = []
    for part in parts:
        matches = sorted(glob.glob(str(Path(part).expanduser())))
        if not matches:
            raise FileNotFoundError(f"DataConfig.dataset: no file matches {part!r}")
        paths += [input_file(m, "DataConfig.dataset") for m in matches]
    return paths


def _read_local(paths: list[Path], text_field: str) -> Iterator[dict[str, Any]]:
    """Records of local files as ``{"text": str | None}``; None marks a malformed record."""
    for path in paths:
        if path.suffix == ".txt":  # one document; a file that is not UTF-8 is one malformed record
            try:
                yield {"text": read_utf8(path)}
            except ValueError:
                yield {"text": None}
        elif path.suffix == ".parquet":
            for value in _parquet_column(path, text_field):
                yield {"text": value if isinstance(value, str) else None}
        else:  # jsonl: one object per line; a bad line is one malformed record
            for _, text, _ in jsonl_records(path, text_field):
                yield {"text": text}


def _parquet_column(path: Path, text_field: str) -> list[Any]:
    """The values of column ``text_field`` of a parquet file; a file that is not parquet or lacks the column fails in one line."""
    try:
        parquet = pyarrow.parquet.ParquetFile(path)
        columns = parquet.schema_arrow.names
        if text_field not in columns:
            raise ValueError(f"DataConfig.text_field: {path} has no column {text_field!r}; its columns: {', '.join(columns)}")
        return parquet.read(columns=[text_field]).column(text_field).to_pylist()
    # a damaged file can fail at any of these steps, in the footer (OSError: "Couldn't deserialize thrift") or the pages
    except (pyarrow.ArrowException, OSError, UnicodeDecodeError) as error:
        raise ValueError(f"DataConfig.dataset: {path} is not a readable parquet file ({one_line(error)})") from None


def jsonl_records(path: Path, text_field: str) -> Iterator[tuple[int, str | None, str | None]]:
    """Each non-blank line of a jsonl file as (line number, text, problem).

    Exactly one of ``text`` and ``problem`` is None; ``problem`` says why a line has no
    text: "not UTF-8", "not valid JSON", "not a JSON object" or "no string '<text_field>' field".
    """
    for number, record, problem in json_lines(path):
        if problem is not None:
            yield number, None, problem
        elif not isinstance(record, dict):
            yield number, None, "not a JSON object"
        elif not isinstance(record.get(text_field), str):
            yield number, None, f"no string {text_field!r} field"
        else:
            yield number, record[text_field], None


def usable(text: str | None) -> bool:
    """Whether a record's text can be a document: a string (not malformed) that is not blank (not empty)."""
    return isinstance(text, str) and text.strip() != ""


def skipped_counts(texts: Iterable[str | None]) -> tuple[int, int, int]:
    """(usable, empty, malformed) counts of records' texts (None: malformed)."""
    texts = list(texts)
    malformed = sum(text is None for text in texts)
    good = sum(usable(text) for text in texts)
    return good, len(texts) - good - malformed, malformed


def load_documents(config: DataConfig) -> Dataset | IterableDataset:
    """All documents of ``config.dataset`` as records ``{"text": str | None}`` (None: malformed).

    Local files without one usable document fail here, with the counts of what was skipped.
    """
    if config.dataset == CHAMP:
        return Dataset.from_list(champ_documents())
    paths = _local_paths(config.dataset)
    if paths is not None:
        for path in paths:
            if path.suffix not in (".jsonl", ".json", ".parquet", ".txt"):
                raise ValueError(f"DataConfig.dataset: {path} is not .jsonl, .json, .parquet or .txt")
        records = list(_read_local(paths, config.text_field))
        good, empty, malformed = skipped_counts(r["text"] for r in records)
        if not good:
            raise ValueError(
                f"DataConfig.dataset: no usable document in {config.dataset!r}: {len(records)} records, {empty} empty, "
                f"{malformed} malformed (not UTF-8, not JSON, not an object, or no string {config.text_field!r} field); "
                "add text or set --text-field to the field that holds it"
            )
        return Dataset.from_list(records)
    # Offline, ``datasets`` fails at once by itself; a hub that does not answer would cost its retries.
    unreachable = None if offline.hub_switched_off() or Path(config.dataset).exists() else offline.hub_unreachable()
    if unreachable:
        raise ConnectionError(f"DataConfig.dataset: cannot stream {config.dataset!r}: the hub cannot be reached ({unreachable}); "
                              f"use local files or '{CHAMP}', or check the network")
    try:
        stream = load_dataset(config.dataset, split=config.hub_split, streaming=True)
    except Exception as error:  # the hub raises many types; all mean "cannot use this name"
        raise ValueError(f"DataConfig.dataset: cannot load {config.dataset!r} from the hub ({type(error).__name__}: {error})") from None
    if stream.column_names is not None and config.text_field not in stream.column_names:
        raise ValueError(f"DataConfig.text_field: {config.dataset!r} has no column {config.text_field!r}; "
                         f"its columns: {', '.join(stream.column_names)}")
    field_name = config.text_field
    return stream.map(lambda r: {"text": r.get(field_name) if isinstance(r.get(field_name), str) else None},
                      remove_columns=list(stream.column_names or []))


def split_heldout(documents: Dataset | IterableDataset, count: int) -> tuple[Dataset | IterableDataset, list[str]]:
    """Set the first ``count`` usable documents aside: (training documents, held-out texts).

    Fails in one line, with the counts of usable and skipped records, when the held-out
    documents leave no usable one to train on.
    """
    heldout, taken = [], 0
    if count > 0:
        for record in documents:
            taken += 1
            if usable(record["text"]):
                heldout.append(record["text"])
            if len(heldout) == count:
                break
    if isinstance(documents, Dataset):
        training = documents.select(range(taken, len(documents))) if taken < len(documents) else documents.select([])
    else:
        training = documents.skip(taken)
    if heldout and not any(usable(record["text"]) for record in training):
        good, empty, malformed = skipped_counts(record["text"] for record in documents)
        raise ValueError(
            f"DataConfig.heldout_documents: all {good} usable documents are held out (heldout_documents = {count}), "
            f"none is left to train on ({empty} empty and {malformed} malformed records skipped); "
            "lower --heldout-documents or add documents"
        )
    return training, heldout


# --- tokens ---------------------------------------------------------------------------------------------


@dataclass
class StreamState:
    """Exact position in the stream: the epoch, the next document of this rank's order, and leftover tokens."""

    epoch: int = 0
    document: int = 0
    buffer: list[int] = field(default_factory=list)


class TokenStream:
    """Endless, resumable stream of [seq_len] token sequences for one rank.

    Args:
        documents: training documents (``load_documents`` then ``split_heldout``).
        tokenizer: the model's tokenizer; EOS (if any) ends each document.
        config: seq_len, packing, min_tokens.
        seed: fixes the document order of every epoch and the crop offsets.
        rank, world_size: this rank's share; ranks read disjoint documents.

    Raises ValueError at construction when the documents cannot give each rank a sequence
    (``_check_enough_text``).
    """

    def __init__(self, documents, tokenizer, config: DataConfig, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.documents, self.tokenizer, self.config = documents, tokenizer, config
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.state = StreamState()
        self.stats = StreamStats()
        self._check_enough_text()

    def _check_enough_text(self) -> None:
        """Fail in one line unless the documents hold a usable document per rank and, when packing, a
        ``seq_len`` of tokens per rank; the message counts what was usable and what was skipped, and why.

        Every rank reads all documents in their stored order (not its own share), so every rank
        decides alike; the scan stops as soon as there is enough, so a large corpus costs a few documents.
        """
        cfg, ranks = self.config, self.world_size
        tokens_needed = ranks * cfg.seq_len if cfg.packing == "pack" else 0
        seen, tokens = StreamStats(), 0
        for record in self.documents:
            ids = self._tokens(record["text"], seen)
            tokens += len(ids) if ids is not None else 0
            if seen.documents >= ranks and tokens >= tokens_needed:
                return
        if cfg.packing == "crop":
            short, knobs = f"under seq_len = {cfg.seq_len} tokens, as crop needs", ["--seq-len"]
        else:
            short, knobs = f"under min_tokens = {cfg.min_tokens} tokens", ["--min-tokens", "--seq-len"]
        if cfg.heldout_documents:
            knobs.append("--heldout-documents")
        need = f"{ranks} rank(s) need a document each" + (f" and {tokens_needed} tokens in all" if tokens_needed else "")
        raise ValueError(
            f"DataConfig.dataset: too little training text in {cfg.dataset!r}: {seen.documents} usable documents "
            f"({tokens} tokens), {need}; skipped {seen.skipped_empty} empty, {seen.skipped_short} too short ({short}), "
            f"{seen.skipped_malformed} malformed; add documents{', use --packing pack' if cfg.packing == 'crop' else ''}, "
            f"or lower {', '.join(knobs[:-1]) + ' or ' if len(knobs) > 1 else ''}{knobs[-1]}"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"state": asdict(self.state), "stats": asdict(self.stats)}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.state = StreamState(**saved["state"])
        self.stats = StreamStats(**saved["stats"])

    def _epoch_documents(self, epoch: int):
        """This rank's documents of ``epoch``, in the epoch's shuffled order."""
        if isinstance(self.documents, Dataset):
            shuffled = self.documents.shuffle(seed=self.seed + epoch)
        else:
            shuffled = self.documents.shuffle(seed=self.seed + epoch, buffer_size=10_000)
        return split_dataset_by_node(shuffled, rank=self.rank, world_size=self.world_size)

    def _tokens(self, text: str | None, stats: StreamStats) -> list[int] | None:
        """Token ids of one document (the tokenizer's own specials, e.g. a BOS, then EOS appended), or None when it
        is skipped (and counted in ``stats``)."""
        if text is None:
            stats.skipped_malformed += 1
            return None
        if not text.strip():
            stats.skipped_empty += 1
            return None
        ids = self.tokenizer(text)["input_ids"]  # with the tokenizer's own specials: Gemma's <bos> starts each document
        if self.tokenizer.eos_token_id is not None:
            ids = ids + [self.tokenizer.eos_token_id]
        needed = self.config.seq_len if self.config.packing == "crop" else self.config.min_tokens
        if len(ids) < max(needed, self.config.min_tokens):
            stats.skipped_short += 1
            return None
        stats.documents += 1
        return ids

    def __iter__(self) -> Iterator[torch.LongTensor]:
        seq_len = self.config.seq_len
        empty_epochs = 0
        while True:
            epoch_docs = self._epoch_documents(self.state.epoch)
            source = epoch_docs.skip(self.state.document) if self.state.document else epoch_docs
            produced = False
            for record in source:
                self.state.document += 1
                ids = self._tokens(record["text"], self.stats)
                if ids is None:
                    continue
                if self.config.packing == "crop":
                    rng = random.Random(f"{self.seed}/{self.state.epoch}/{self.rank}/{self.state.document}")
                    start = rng.randrange(len(ids) - seq_len + 1)
                    self.state.buffer = ids[start : start + seq_len]
                else:
                    self.state.buffer += ids
                # The state is updated before each yield, so a checkpoint taken there resumes right after it.
                while len(self.state.buffer) >= seq_len:
                    window, self.state.buffer = self.state.buffer[:seq_len], self.state.buffer[seq_len:]
                    produced = True
                    self.stats.sequences += 1
                    yield torch.tensor(window, dtype=torch.long)
            empty_epochs = 0 if produced else empty_epochs + 1
            if empty_epochs >= 2:
                raise ValueError(
                    f"DataConfig.dataset: rank {self.rank} read a whole epoch of {self.config.dataset!r} without one "
                    f"{seq_len}-token sequence ({asdict(self.stats)}); use more data, a shorter seq_len or packing"
                )
            self.state = StreamState(epoch=self.state.epoch + 1, document=0, buffer=self.state.buffer)

    def batches(self, batch_size: int) -> Iterator[torch.LongTensor]:
        """[batch_size, seq_len] batches (every sequence is full length: no padding)."""
        sequences = iter(self)
        while True:
            yield torch.stack([next(sequences) for _ in range(batch_size)])


def pad_rows(rows: list[list[int]], pad_id: int = 0, left: bool = False) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Token rows as one batch: (input_ids [B, L], attention_mask [B, L]), padded on the right (or the left).

    The attention mask hides the padding, so any id in the vocabulary works as ``pad_id``.
    """
    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(length - len(row), length) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def heldout_batches(texts: list[str], tokenizer, seq_len: int, batch_size: int) -> list[tuple[torch.LongTensor, torch.Tensor]]:
    """Fixed held-out batches: each text's first ``seq_len`` tokens, right padded; (input_ids, attention_mask) pairs."""
    rows = [tokenizer(t)["input_ids"][:seq_len] for t in texts]  # as the training documents: with the tokenizer's specials
    rows = [r for r in rows if len(r) >= 2]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return [pad_rows(rows[start : start + batch_size], pad) for start in range(0, len(rows), batch_size)]
