"""Small offline fixtures and the independent, one-position-at-a-time computations the tests compare against."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, LlamaConfig, MistralConfig, Olmo2Config, Phi3Config,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen3Config)

WORDS = ["<pad>", "<unk>", "<eos>", "---"] + [str(i) for i in range(10)] + (
    "the a sum of is and plus minus times equals x y so then we get half twice number".split()
)
ROOT = Path(__file__).resolve().parents[1]
FAMILIES = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "gpt2": GPT2Config, "qwen3": Qwen3Config,
            "gemma3_text": Gemma3TextConfig, "phi3": Phi3Config, "olmo2": Olmo2Config}
NEW_FAMILIES = ("qwen3", "gemma3_text", "phi3", "olmo2")  # each with what sets it apart: QK norms, local layers, fused projections
FAMILY_SETTINGS = {
    "qwen3": dict(head_dim=8),  # per-head QK norm
    # QK norm, scaled embeddings, (1 + w) norms, a local (sliding-window) layer with its own RoPE base, then a global one
    "gemma3_text": dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=64, layer_types=["sliding_attention", "full_attention"]),
    "phi3": dict(pad_token_id=0, bos_token_id=1, eos_token_id=2),  # fused qkv_proj and gate_up_proj
    "olmo2": dict(pad_token_id=0, bos_token_id=1, eos_token_id=2),  # QK norm over all heads, norms after each block
}


def tiny_tokenizer(words: list[str] = WORDS) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over ``words`` (default ``WORDS``)."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def training_fixture(root: Path, **lm_settings) -> Path:
    """``root/model`` (a tiny random Llama saved as a plain HF dir; ``lm_settings`` override its config) and
    ``root/text.jsonl`` (80 random documents)."""
    import json
    import random

    tiny_lm("llama", **lm_settings).save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    rng = random.Random(0)
    with (root / "text.jsonl").open("w") as f:
        for _ in range(80):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS[3:]) for _ in range(rng.randint(10, 50)))}) + "\n")
    return root


def tiny_lm(family: str = "llama", seed: int = 0, attn: str = "sdpa", **overrides):
    """A random 2-layer model of the given family, fp32, vocabulary = ``WORDS``."""
    torch.manual_seed(seed)
    settings = dict(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.1,
    )
    if family == "gpt2":  # GPT-2 names its MLP width n_inner and has no grouped-query heads
        settings["n_inner"] = settings.pop("intermediate_size")
        settings.pop("num_key_value_heads")
    settings.update(FAMILY_SETTINGS.get(family, {}))
    settings.update(overrides)
    config = FAMILIES[family](**settings)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


def move_off_init(model, head_scale: float = 0.0):
    """Perturb the markers (so <sot> and <eot> differ) and, if ``head_scale``, the mixing head (so thoughts matter)."""
    with torch.no_grad():
        model.start_embedding.add_(0.3 * torch.randn_like(model.start_embedding))
        model.end_embedding.add_(0.3 * torch.randn_like(model.end_embedding))
        if head_scale:
            for p in model.mixing_head.parameters():
                p.add_(head_scale * torch.randn_like(p))
    return model


def step_with_grads(model, ids: torch.Tensor, mask: torch.Tensor, thoughts: torch.Tensor):
    """The model's forward on given thoughts, and every trainable parameter's gradient of its loss; ``.grad`` is left zeroed."""
    out = model(ids, mask, thoughts=thoughts)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return out, grads


def assert_step_matches_oracle(model, ids: torch.Tensor, mask: torch.Tensor, thoughts: torch.Tensor, atol: float = 2e-5):
    """The model's losses and every trainable parameter's gradient equal ``independent_losses``'s; returns the output."""
    out, grads = step_with_grads(model, ids, mask, thoughts)
    ref = independent_losses(model, ids, mask, thoughts)
    ref["loss"].backward()
    for name in ("loss", "base_nll", "talk_nll", "policy_loss"):
        torch.testing.assert_close(getattr(out, name), ref[name].detach(), atol=atol, rtol=1e-5, msg=name)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[name], p.grad, atol=atol, rtol=1e-4, msg=name)
    return out


def padded_batch(seed: int = 0, lengths=(8, 5), vocab: int = len(WORDS)):
    """Random right-padded ids [B, L] and attention mask [B, L]."""
    g = torch.Generator().manual_seed(seed)
    length = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), length), generator=g)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
        ids[b, n:] = 0
    return ids, mask


def sequence_hidden(lm, embeds: torch.Tensor) -> torch.Tensor:
    """Plain HF decoder over one unpadded sequence of embeddings [T, H] -> last hidden [T, H]."""
    return lm.get_decoder()(inputs_embeds=embeds[None]).last_hidden_state[0]


def independent_greedy_thought(lm, start: torch.Tensor, prefix: torch.Tensor, thought_len: int) -> list[int]:
    """Greedy thought after ``prefix`` [t+1]: plain model on [x_<=t, <sot>], decoding one token at a time."""
    embed = lm.get_input_embeddings()
    seq = torch.cat([embed(prefix), start[None]], dim=0)
    tokens = []
    for _ in range(thought_len):
        logits = lm(inputs_embeds=seq[None]).logits[0, -1]
        token = int(logits.argmax())
        tokens.append(token)
        seq = torch.cat([seq, embed(torch.tensor([token]))], dim=0)
    return tokens


def independent_thought_pass(model, ids_b: torch.Tensor, t: int, thought: torch.Tensor, n_targets: int):
    """One position's thought as a plain sequence [x_<=t, <sot>, z, <eot>, x_{t+1..t+n_targets-1}].

    Returns (post-thought hidden states [n_targets, H] predicting x_{t+1..t+n_targets},
    hidden states [M, H] at <sot>, z_1..z_{M-1} that predict the thought tokens).
    """
    lm = model.lm
    embed = lm.get_input_embeddings()
    parts = [
        embed(ids_b[: t + 1]),
        model.start_embedding[None],
        embed(thought),
        model.end_embedding[None],
        embed(ids_b[t + 1 : t + n_targets]),
    ]
    hidden = sequence_hidden(lm, torch.cat(parts, dim=0))
    m = thought.shape[0]
    return hidden[t + 2 + m : t + 2 + m + n_targets], hidden[t + 1 : t + 1 + m]


def independent_losses(model, ids: torch.Tensor, mask: torch.Tensor, thoughts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Quiet-STaR losses computed position by position from ``independent_thought_pass``.

    Follows ``model.config.loss_reduction``: ``token`` averages the talk NLL over every
    (t, r, j) and the policy loss (summed over the M thought tokens) over every (t, r);
    ``reference`` averages the talk NLL per j, then over j, and the policy loss per
    thought token over all B * R * (L - 1 - K) slots of the padded batch.
    """
    cfg = model.config
    lm_head = model.lm.get_output_embeddings()
    batch, length = ids.shape
    reference_slots = max(length - 1 - cfg.n_true, 0)
    base_terms, talk_terms, policy_terms = [], [], []
    talk_by_j = [[] for _ in range(cfg.n_true)]
    for b in range(batch):
        n = int(mask[b].sum())
        seq = ids[b, :n]
        base_hidden = sequence_hidden(model.lm, model.lm.get_input_embeddings()(seq))  # [n, H]
        base_lp = F.log_softmax(lm_head(base_hidden), dim=-1)
        base_terms += [-base_lp[t, seq[t + 1]] for t in range(n - 1)]
        for t in range(n - 1):
            k = min(cfg.n_true, n - 1 - t)
            scores, thought_lps = [], []
            for r in range(cfg.n_thoughts):
                post, policy_hidden = independent_thought_pass(model, seq, t, thoughts[b, t, r], k)
                h_base = base_hidden[t : t + k]
                w = model.mixing_head.mlp(torch.cat([h_base, post], dim=-1))
                talk = F.log_softmax(lm_head(h_base + w * (post - h_base)), dim=-1)
                lp = talk[torch.arange(k), seq[t + 1 : t + 1 + k]]
                talk_terms += list(-lp)
                for j in range(k):
                    talk_by_j[j].append(-lp[j])
                scores.append(lp.sum())
                policy = F.log_softmax(lm_head(policy_hidden) / cfg.policy_temperature, dim=-1)
                thought_lps.append(policy[torch.arange(cfg.thought_len), thoughts[b, t, r]])
            scores = torch.stack(scores).detach()
            rewards = scores - scores.mean()
            if cfg.positive_rewards_only:
                rewards = rewards.clamp(min=0)
            if cfg.loss_reduction == "token":
                policy_terms += [-rewards[r] * thought_lps[r].sum() for r in range(cfg.n_thoughts)]
            elif t < reference_slots:
                policy_terms += [-rewards[r] * thought_lps[r].sum() for r in range(cfg.n_thoughts)]
    if cfg.loss_reduction == "token":
        talk_nll, policy_loss = torch.stack(talk_terms).mean(), torch.stack(policy_terms).mean()
    else:
        talk_nll = torch.stack([torch.stack(terms).mean() for terms in talk_by_j]).mean()
        policy_loss = torch.stack(policy_terms).sum() / (batch * cfg.n_thoughts * reference_slots * cfg.thought_len)
    out = {"base_nll": torch.stack(base_terms).mean(), "talk_nll": talk_nll, "policy_loss": policy_loss}
    out["loss"] = cfg.base_loss_weight * out["base_nll"] + cfg.talk_loss_weight * out["talk_nll"] + cfg.policy_loss_weight * out["policy_loss"]
    return out


def independent_coconut_logits(model, ids: list[int]) -> torch.Tensor:
    """Coconut by hand for one unpadded example: logits [T, V], one position at a time, over the plain HF model.

    Position t's input is the token's embedding, a marker vector, or, at a latent, the last
    hidden state (``hidden_states[-1]``, after the final norm) of a fresh forward over
    positions 0..t-1 with ``inputs_embeds``. The logits come from a forward over the finished embeddings.
    """
    from quietstar.coconut.markers import BOT, EOT, LATENT, PAUSE

    lm, embedding = model.lm, model.lm.get_input_embeddings()
    markers = {BOT: model.markers.bot, EOT: model.markers.eot, PAUSE: model.markers.pause}
    inputs = []
    for token in ids:
        if token == LATENT:
            hidden = lm(inputs_embeds=torch.stack(inputs)[None], output_hidden_states=True).hidden_states[-1]
            inputs.append(hidden[0, -1])
        elif token < 0:
            inputs.append(markers[token])
        else:
            inputs.append(embedding(torch.tensor(token)))  # the module, not its rows: Gemma 3 scales them
    return lm(inputs_embeds=torch.stack(inputs)[None]).logits[0]


def independent_coconut(model, rows: list[tuple[list[int], list[int]]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each row's ``independent_coconut_logits`` and the mean cross-entropy over all rows' labelled targets
    (rows are (ids with placeholders, labels), unpadded)."""
    all_logits, total, count = [], 0.0, 0
    for ids, labels in rows:
        logits = independent_coconut_logits(model, ids)
        all_logits.append(logits)
        for t in range(len(ids) - 1):
            if labels[t + 1] != -100:
                total = total + F.cross_entropy(logits[t].float(), torch.tensor(labels[t + 1]))
                count += 1
    return all_logits, total / count


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(command: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result
