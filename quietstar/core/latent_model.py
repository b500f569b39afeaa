"""What every latent-reasoning method shares: a wrapped Hugging Face causal LM.

A method (Quiet-STaR, Coconut) subclasses ``LatentReasoningModel``, adds its own
modules in ``__init__``, states which base models it can wrap
(``supported_families``, ``check_base_model``) and defines ``forward``. This base
class checks the base model and saves/loads the whole thing:

    <dir>/config.json, model.safetensors   the base LM, as ``save_pretrained`` writes it
    <dir>/tokenizer*                       the tokenizer
    <dir>/<method>_config.json             {"method", "format_version", "tokenizer_class", "config"}
    <dir>/<method>_modules.safetensors     the method's own weights (everything outside ``lm``)

The base weights are a stock Hugging Face checkpoint, so
``AutoModelForCausalLM.from_pretrained(dir)`` loads them with no patched class.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import ClassVar

import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

ATTENTION_PREFIX = "quietstar_"  # a method that routes attention through its own dispatcher registers it under this prefix


def base_attention(lm: PreTrainedModel) -> str:
    """The model's own attention implementation, with a method's dispatcher prefix removed."""
    return lm.config._attn_implementation.removeprefix(ATTENTION_PREFIX)


class LatentReasoningModel(nn.Module):
    """A base causal LM plus a method's own modules.

    Subclasses set ``method`` (the file prefix), ``config_class``, ``format_version``
    (bumped when the method's saved weights change shape) and ``supported_families``
    (HF ``model_type`` names), and may extend ``check_base_model``.
    """

    method: ClassVar[str]
    config_class: ClassVar[type]
    format_version: ClassVar[int]
    supported_families: ClassVar[tuple[str, ...]]

    def __init__(self, base_model: PreTrainedModel, tokenizer, config) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.check_base_model(base_model, tokenizer)
        self.lm = base_model
        self.tokenizer = tokenizer
        self.config = config

    @classmethod
    def check_base_model(cls, lm: PreTrainedModel, tokenizer) -> None:
        """Fail with one clear line if ``lm``/``tokenizer`` cannot be wrapped by this method."""
        family = getattr(lm.config, "model_type", None)
        if family not in cls.supported_families:
            raise ValueError(
                f"{cls.__name__}: unsupported model family {family!r} ({type(lm).__name__}); "
                f"supported: {', '.join(cls.supported_families)}"
            )
        if getattr(lm.config, "final_logit_softcapping", None) is not None:
            raise ValueError(f"{cls.__name__}: {type(lm).__name__} soft-caps its logits (final_logit_softcapping), "
                             "which the method's own uses of the LM head do not; set it to None or pick another model")
        rows = lm.get_input_embeddings().num_embeddings
        if len(tokenizer) > rows:
            raise ValueError(
                f"tokenizer/model mismatch: the tokenizer has {len(tokenizer)} tokens but the model's embedding has {rows} rows"
            )

    def marker_parameters(self) -> list[nn.Parameter]:
        """The method's learned marker embeddings, which get their own optimizer group (``core.optim``)."""
        raise NotImplementedError

    @property
    def marker_lr_multiplier(self) -> float:
        """The markers' learning rate as a multiple of the model's."""
        raise NotImplementedError

    def method_state_dict(self) -> dict[str, torch.Tensor]:
        """The method's own weights: every entry of the state dict outside the base LM."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("lm.")}

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.lm.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.method_state_dict().items()}
        save_file(tensors, directory / f"{self.method}_modules.safetensors")
        meta = {
            "method": self.method,
            "format_version": self.format_version,
            "tokenizer_class": type(self.tokenizer).__name__,
            "config": dataclasses.asdict(self.config),
        }
        (directory / f"{self.method}_config.json").write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load_tokenizer(cls, directory: str | Path):
        """The tokenizer of a directory written by ``save_pretrained``, of the class that was saved
        (AutoTokenizer may pick another one from the model type)."""
        meta = json.loads((Path(directory) / f"{cls.method}_config.json").read_text())
        return getattr(transformers, meta.get("tokenizer_class", ""), AutoTokenizer).from_pretrained(directory)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, dtype: torch.dtype | str = "auto", device: torch.device | str | None = None
    ) -> "LatentReasoningModel":
        """Load a directory written by ``save_pretrained``."""
        directory = Path(directory)
        meta_path = directory / f"{cls.method}_config.json"
        weights_path = directory / f"{cls.method}_modules.safetensors"
        for path in (meta_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: {directory} is not a saved {cls.__name__}")
        meta = json.loads(meta_path.read_text())
        if meta.get("method") != cls.method or meta.get("format_version") != cls.format_version:
            raise ValueError(
                f"{meta_path}: expected method {cls.method!r} format {cls.format_version}, "
                f"got {meta.get('method')!r} format {meta.get('format_version')!r}"
            )
        lm = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
        if device is not None:
            lm.to(device)
        model = cls(lm, cls.load_tokenizer(directory), cls.config_class(**meta["config"]))
        own = load_file(weights_path, device=str(lm.device))
        missing = set(model.method_state_dict()) - set(own)
        unexpected = set(own) - set(model.method_state_dict())
        if missing or unexpected:
            raise ValueError(f"{weights_path}: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
        model.load_state_dict(own, strict=False)
        return model
