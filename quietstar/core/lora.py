"""LoRA adapters on a method's base LM, through ``peft``, for either method.

``add_lora`` puts the adapters into the Hugging Face model in place: the model keeps its class
and its module names (a wrapped linear layer's weight becomes ``...q_proj.base_layer.weight``,
next to ``...q_proj.lora_A.default.weight`` and ``lora_B``), so the methods' code and the
exactness oracles, which call the HF model directly, run on it unchanged. Every base weight
is frozen; the method's own modules (markers, mixing head), which live outside the LM, stay
trainable in full.

The wrapper ``add_lora`` returns is peft's own: ``wrapper.save_pretrained(dir)`` writes the
adapters in peft's format and ``wrapper.merge_and_unload()`` folds them into the base weights
(W + scale * B @ A) and removes them, so the model saves as a stock checkpoint again.
"""

from __future__ import annotations

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel


def lora_config(rank: int, alpha: float, dropout: float, target_modules: str) -> LoraConfig:
    """``target_modules``: ``all-linear`` (every linear layer but the output head) or comma-separated module names."""
    targets = "all-linear" if target_modules == "all-linear" else [name.strip() for name in target_modules.split(",")]
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")


def add_lora(lm: PreTrainedModel, config: LoraConfig) -> PeftModel:
    """Add adapters to ``lm`` in place and freeze its other parameters; returns peft's wrapper around ``lm``
    (to save or merge the adapters; the method model keeps ``lm`` itself)."""
    wrapper = get_peft_model(lm, config)
    if wrapper.base_model.model is not lm:
        raise RuntimeError("add_lora: peft did not wrap the model in place")
    return wrapper
