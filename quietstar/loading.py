"""Load the model an entry point was pointed at: the offline default, a plain HF model, or a saved QuietStarModel."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from quietstar.config import QuietStarConfig
from quietstar.model import QuietStarModel
from quietstar.offline import SMOLLM2, resolve_model_path


def is_saved_quietstar(path: str | Path) -> bool:
    """True when ``path`` is a directory written by ``QuietStarModel.save_pretrained``."""
    return (Path(path) / f"{QuietStarModel.method}_config.json").is_file()


def load_model(name: str, config: QuietStarConfig, dtype: torch.dtype = torch.float32) -> QuietStarModel:
    """A QuietStarModel from ``name``.

    ``name`` is the offline default (``smollm2-135m``), a saved QuietStarModel dir (its
    own config is used and ``config`` is ignored), a plain HF causal-LM dir, or a hub id
    (wrapped with fresh Quiet-STaR modules and ``config``).
    """
    path = resolve_model_path(name)
    if is_saved_quietstar(path):
        return QuietStarModel.from_pretrained(path, dtype=dtype)
    if not Path(path).is_dir() and (Path(path).is_absolute() or path.startswith(".")):
        raise FileNotFoundError(f"model directory not found: {path}")
    try:
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FileNotFoundError(f"cannot load model {name!r}: not '{SMOLLM2}', a local model dir or a reachable hub id ({first_line})") from None
    return QuietStarModel(lm, tokenizer, config)
