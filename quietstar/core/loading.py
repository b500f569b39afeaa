"""Load the model an entry point was pointed at: the offline default, a plain HF model, or a method's saved model."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from quietstar.core.latent_model import LatentReasoningModel
from quietstar.core.offline import SMOLLM2, resolve_model_path

M = TypeVar("M", bound=LatentReasoningModel)


def is_saved(path: str | Path, model_class: type[LatentReasoningModel]) -> bool:
    """True when ``path`` is a directory written by ``model_class.save_pretrained``."""
    return (Path(path) / f"{model_class.method}_config.json").is_file()


def load_base(name: str, dtype: torch.dtype = torch.float32):
    """(causal LM, tokenizer) from the offline default's name, a local HF model dir or a hub id."""
    path = resolve_model_path(name)
    if not Path(path).is_dir() and (Path(path).is_absolute() or path.startswith(".")):
        raise FileNotFoundError(f"model directory not found: {path}")
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
    path = resolve_model_path(name)
    if is_saved(path, model_class):
        return model_class.from_pretrained(path, dtype=dtype)
    lm, tokenizer = load_base(name, dtype)
    return model_class(lm, tokenizer, config)
