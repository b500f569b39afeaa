"""Load the model an entry point was pointed at: the offline default, a plain HF model, or a method's saved model."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from quietstar.core.latent_model import LatentReasoningModel
from quietstar.core.offline import SMOLLM2, locate_model

M = TypeVar("M", bound=LatentReasoningModel)


def is_saved(path: str | Path, model_class: type[LatentReasoningModel]) -> bool:
    """True when ``path`` is a directory written by ``model_class.save_pretrained``."""
    return (Path(path) / f"{model_class.method}_config.json").is_file()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")  # any one of them


def load_tokenizer(model_class: type[LatentReasoningModel], name: str):
    """The tokenizer ``load_model(model_class, name, ...)`` would give its model, without loading any weights."""
    path = locate_model(name)
    if is_saved(path, model_class):
        return model_class.load_tokenizer(path)
    _check_model_dir(name, path)
    return AutoTokenizer.from_pretrained(path)


def _check_model_dir(name: str, path: str) -> None:
    """A local directory must hold ``config.json`` and a tokenizer (a hub id is checked by transformers). A part
    of a training run (a checkpoint, its ``checkpoints``, the run's directory) is named, with the model to pass."""
    if Path(path).is_dir():
        has_config = (Path(path) / "config.json").is_file()
        has_tokenizer = any((Path(path) / file).is_file() for file in TOKENIZER_FILES)
        if not (has_config and has_tokenizer) and (message := _part_of_a_run(name, Path(path))):
            raise FileNotFoundError(message)
        if not has_config:
            raise FileNotFoundError(f"--model {name!r}: not a Hugging Face model directory (no config.json)")
        if not has_tokenizer:
            raise FileNotFoundError(f"--model {name!r}: the directory has no tokenizer ({', '.join(TOKENIZER_FILES)}); "
                                    "save one there with tokenizer.save_pretrained")


def _part_of_a_run(name: str, path: Path) -> str | None:
    """The message for a piece of a training run given as ``--model``: what it is and the model to pass instead."""
    from quietstar.training.checkpoints import part_of_a_run  # the run's layout is defined there

    found = part_of_a_run(path)
    if found is None:
        return None
    what, run = found
    models = [str(run / target) for target in ("final", "best") if (run / target / "config.json").is_file()]
    instead = (f"pass {' or '.join(models)}" if models
               else f"the run writes its model to {run / 'final'} when it ends (continue it with --resume)")
    return f"--model {name!r} is {what}; {instead}"


def load_base(name: str, dtype: torch.dtype = torch.float32):
    """(causal LM, tokenizer) from the offline default's name, a local HF model dir or a hub id.

    A name that cannot be had (``offline.locate_model``), or a local directory without ``config.json``
    or without a tokenizer, fails before anything loads.
    """
    path = locate_model(name)
    _check_model_dir(name, path)
    try:
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FileNotFoundError(f"cannot load model {name!r}: not '{SMOLLM2}', a local model dir or a reachable hub id ({first_line})") from None
    return lm, tokenizer


def load_model(model_class: type[M], name: str, config, dtype: torch.dtype = torch.float32) -> M:
    """A ``model_class`` from ``name``.

    ``name`` is the offline default (``smollm2-135m``), a directory saved by
    ``model_class.save_pretrained`` (its own config is used and ``config`` is ignored),
    a plain HF causal-LM dir, or a hub id (wrapped with fresh method modules and ``config``).
    """
    path = locate_model(name)
    if is_saved(path, model_class):
        return model_class.from_pretrained(path, dtype=dtype)
    lm, tokenizer = load_base(name, dtype)
    return model_class(lm, tokenizer, config)
