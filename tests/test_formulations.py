"""The one-pass and efficient (sample, then replay) formulations against the sequential oracle.

They run on the same weights and the same thoughts; the losses and the gradient of
every parameter must agree in fp32 to a relative tolerance of 1e-5.
"""

import warnings

import pytest
import torch
from helpers import NEW_FAMILIES, move_off_init, padded_batch, tiny_lm, tiny_tokenizer

from quietstar import QuietStarConfig, QuietStarModel

from transformers import AttentionInterface

from quietstar.quiet_star.thought_attention import ThoughtLayout, resolve_backend, thought_attention_mask, thought_block_mask

RTOL = 1e-5
WELL_CONDITIONED = ("loss", "base_nll", "talk_nll", "mixing_weight_mean")


def trained_looking_model(family: str, formulation: str, dtype=torch.float32, lm_settings: dict | None = None,
                          **config) -> QuietStarModel:
    """A tiny model whose markers and mixing head are off their initial values, so every loss term is live.
    ``lm_settings`` override the base LM's config (``tiny_lm``)."""
    torch.manual_seed(3)
    model = QuietStarModel(tiny_lm(family, **(lm_settings or {})), tiny_tokenizer(), QuietStarConfig(formulation=formulation, **config))
    return move_off_init(model, head_scale=0.2).to(dtype)


def step(model: QuietStarModel, ids, mask, thoughts):
    model.zero_grad()
    out = model(ids, mask, thoughts=thoughts)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return out, grads


def close(actual, expected, name, rtol=RTOL, scale=None):
    """``actual`` == ``expected`` to ``rtol`` of each entry, or of ``scale`` (default: the largest |expected|)."""
    scale = float(expected.abs().max()) if scale is None else scale
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{name}: {m}")


def assert_same_step(reference, candidate, thought_logprobs):
    """Losses, per-token log-probs, rewards and every parameter's gradient agree.

    The rewards are differences of talk log-prob sums, and the policy loss is a
    mean of terms r * sum_i log p(z_i) that cancel; their tolerance is relative
    to the size of those sums and terms (an fp32 reward near 0 cannot carry 1e-5
    of itself). ``thought_logprobs`` [B, L, R, M] is the oracle's, for that scale.
    """
    (ref_out, ref_grads), (out, grads) = reference, candidate
    for name in WELL_CONDITIONED:
        close(getattr(out, name), getattr(ref_out, name), name, scale=0.0)
    close(out.talk_logprobs, ref_out.talk_logprobs, "talk_logprobs")
    score = float(ref_out.talk_logprobs.sum(dim=-1).abs().max())  # the log-prob sums the rewards are differences of
    close(out.rewards, ref_out.rewards, "rewards", scale=score)
    close(out.reward_mean, ref_out.reward_mean, "reward_mean", scale=score)
    terms = (ref_out.rewards.abs() * thought_logprobs.detach().sum(dim=-1).abs())[ref_out.target_mask[..., 0]]
    close(out.policy_loss, ref_out.policy_loss, "policy_loss", scale=float(terms.mean()))
    assert ref_grads.keys() == grads.keys()
    for name, ref in ref_grads.items():
        assert float(ref.abs().max()) > 0, f"{name} got no gradient"
        close(grads[name], ref, name)  # relative to the gradient's own scale


CASES = [  # family, R, M, K: every M in 1..8, every K in 1..4, R in {2, 3}, two families
    ("llama", 2, 1, 1),
    ("qwen2", 3, 2, 2),
    ("llama", 2, 3, 3),
    ("qwen2", 2, 4, 4),
    ("llama", 3, 5, 1),
    ("qwen2", 2, 6, 3),
    ("llama", 2, 7, 2),
    ("qwen2", 3, 8, 4),
    ("qwen3", 2, 3, 2),  # the newer families, one case each
    ("gemma3_text", 3, 4, 3),
    ("phi3", 2, 2, 4),
    ("olmo2", 2, 5, 1),
]


# The reward mode acts on the losses, after the rollout that the formulations differ in: the efficient step runs the
# grid in both modes, the one pass in one mode per case, alternating.
STEP_CASES = ([("efficient", positive_only, *case) for case in CASES for positive_only in (True, False)]
              + [("one_pass", i % 2 == 0, *case) for i, case in enumerate(CASES)])


@pytest.mark.parametrize("formulation,positive_only,family,R,M,K", STEP_CASES)
def test_step_matches_sequential_oracle(formulation, family, R, M, K, positive_only):
    # Both reductions over the grid; policy weight 1, so that the loss is not the 1e6-scaled cancelling policy sum.
    settings = dict(thought_len=M, n_true=K, n_thoughts=R, positive_rewards_only=positive_only, policy_temperature=1.5,
                    policy_loss_weight=1.0, loss_reduction="reference" if M % 2 else "token")
    oracle = trained_looking_model(family, "sequential", **settings)
    efficient = trained_looking_model(family, formulation, **settings)
    ids, mask = padded_batch(seed=M, lengths=(9, 6, 3))  # right padding of several lengths
    thoughts = oracle.sample_thoughts(ids, mask, generator=torch.Generator().manual_seed(M))
    reference = step(oracle, ids, mask, thoughts)
    assert float(reference[0].policy_loss) != 0.0
    with torch.no_grad():
        (ref_base, ref_rollout), (base, rollout) = oracle.rollout(ids, mask, thoughts=thoughts), efficient.rollout(ids, mask, thoughts=thoughts)
    valid = mask.bool()
    close(base[valid], ref_base[valid], "h_base")
    close(rollout.post_hidden[valid], ref_rollout.post_hidden[valid], "post_hidden")
    close(rollout.thought_logprobs[valid], ref_rollout.thought_logprobs[valid], "thought_logprobs")
    assert_same_step(reference, step(efficient, ids, mask, thoughts), ref_rollout.thought_logprobs)


@pytest.mark.parametrize("formulation", ["one_pass", "efficient"])
@pytest.mark.parametrize("family,R,M,K", CASES[1::3])
def test_in_float64_the_reward_terms_match_to_1e_5_of_themselves(family, R, M, K, formulation):
    """Without fp32 rounding in the log-prob sums, the rewards, the policy loss and
    ``reward_mean`` agree entry by entry too. (HF's RMSNorm computes in fp32 even
    in a float64 model, so gradients keep fp32-level differences; they are checked
    against their scale as above.)"""
    settings = dict(thought_len=M, n_true=K, n_thoughts=R, positive_rewards_only=False, policy_loss_weight=1.0)
    oracle = trained_looking_model(family, "sequential", torch.float64, **settings)
    efficient = trained_looking_model(family, formulation, torch.float64, **settings)
    ids, mask = padded_batch(seed=M, lengths=(9, 6, 3))
    thoughts = oracle.sample_thoughts(ids, mask, generator=torch.Generator().manual_seed(M))
    (ref_out, ref_grads), (out, grads) = step(oracle, ids, mask, thoughts), step(efficient, ids, mask, thoughts)
    for name in WELL_CONDITIONED + ("policy_loss", "reward_mean"):
        close(getattr(out, name), getattr(ref_out, name), name, scale=0.0)
    close(out.rewards, ref_out.rewards, "rewards", scale=0.0)
    for name, ref in ref_grads.items():
        close(grads[name], ref, name)


@pytest.mark.parametrize("family", ["llama", "qwen2", *NEW_FAMILIES])
def test_efficient_sampling_matches_sequential_sampling(family):
    settings = dict(thought_len=5, n_true=2, n_thoughts=3)
    oracle = trained_looking_model(family, "sequential", **settings)
    efficient = trained_looking_model(family, "efficient", **settings)
    ids, mask = padded_batch(lengths=(8, 4))
    valid = mask.bool()
    greedy = efficient.sample_thoughts(ids, mask, greedy=True)
    assert torch.equal(greedy[valid], oracle.sample_thoughts(ids, mask, greedy=True)[valid])
    # Sampling: the same generator draws the same uniforms, and the logits agree to ~1e-6.
    sampled = efficient.sample_thoughts(ids, mask, generator=torch.Generator().manual_seed(0))
    expected = oracle.sample_thoughts(ids, mask, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled[valid], expected[valid])


@pytest.mark.parametrize("family", ["llama", "qwen2", *NEW_FAMILIES])
def test_the_one_pass_step_samples_the_thoughts_sample_thoughts_draws(family):
    """Sampling inside the trained forwards draws what the no-gradient sampler draws for the same generator."""
    model = trained_looking_model(family, "one_pass", thought_len=4, n_true=2, n_thoughts=3).train()
    ids, mask = padded_batch(lengths=(8, 5))
    valid = mask.bool()
    out = model(ids, mask, generator=torch.Generator().manual_seed(11))
    expected = model.sample_thoughts(ids, mask, generator=torch.Generator().manual_seed(11))
    assert torch.equal(out.thoughts[valid], expected[valid])
    assert len(out.thoughts[valid].unique()) > 1
    out.loss.backward()  # and the step trains on them
    assert all(p.grad is not None for p in model.parameters())


def saved_bytes(model: QuietStarModel, ids, mask, thoughts) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of one step."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(ids, mask, thoughts=thoughts)
    return sum(storages.values())


def test_the_one_pass_step_keeps_less_for_backward_than_the_replay_and_grows_linearly_in_m():
    """Each block's keys are kept once (no concatenated KV cache): saved memory grows ~linearly in M, and the text
    pass runs on B rows, not B*R, so it stays below the replay's."""
    ids, mask = padded_batch(lengths=(12, 9))
    saved = {}
    for M in (4, 8):
        for formulation in ("one_pass", "efficient"):
            model = trained_looking_model("llama", formulation, thought_len=M, n_true=2, n_thoughts=2).train()
            thoughts = model.sample_thoughts(ids, mask, greedy=True)
            saved[formulation, M] = saved_bytes(model, ids, mask, thoughts)
    for M in (4, 8):
        assert saved["one_pass", M] < saved["efficient", M]
    blocks = {M: M + 2 + 1 for M in (4, 8)}  # thought-side blocks (M + K + 1) and the text
    assert saved["one_pass", 8] / saved["one_pass", 4] < 1.1 * (blocks[8] + 1) / (blocks[4] + 1)


def test_gradient_checkpointing_gives_the_same_step():
    settings = dict(thought_len=3, n_true=2)
    plain = trained_looking_model("llama", "efficient", **settings).train()
    checkpointed = trained_looking_model("llama", "efficient", **settings).train()
    checkpointed.lm.activation_checkpointing_enable()
    ids, mask = padded_batch(lengths=(8, 5))
    thoughts = plain.sample_thoughts(ids, mask, generator=torch.Generator().manual_seed(0))
    # Sampling under checkpointing still runs on the KV cache (it switches to inference mode) ...
    assert torch.equal(checkpointed.sample_thoughts(ids, mask, greedy=True), plain.sample_thoughts(ids, mask, greedy=True))
    assert checkpointed.training and checkpointed.lm.training
    # ... and the replay recomputes each layer in backward.
    with torch.no_grad():
        thought_logprobs = plain.rollout(ids, mask, thoughts=thoughts)[1].thought_logprobs
    assert_same_step(step(plain, ids, mask, thoughts), step(checkpointed, ids, mask, thoughts), thought_logprobs)


@pytest.mark.parametrize("formulation", ["sequential", "one_pass"])
def test_the_formulations_that_keep_keys_refuse_gradient_checkpointing(formulation):
    model = trained_looking_model("llama", formulation, thought_len=2, n_true=2).train()
    model.lm.activation_checkpointing_enable()
    ids, mask = padded_batch()
    with pytest.raises(ValueError, match=f"gradient checkpointing is not supported by the {formulation}"):
        model(ids, mask)


def dense_reference(query, key, value, text_mask, layout, scaling):
    """Attention with an explicit [S_q*L, S_k*L] mask built position by position (small sizes only)."""
    n, heads, q_len, dim = query.shape
    length = layout.length
    key = key.repeat_interleave(heads // key.shape[1], dim=1)
    value = value.repeat_interleave(heads // value.shape[1], dim=1)
    allowed = torch.zeros(n, q_len, key.shape[2], dtype=torch.bool)
    for q in range(q_len):
        q_segment, q_pos = q // length + layout.first_query_segment, q % length
        for k in range(key.shape[2]):
            k_segment, k_pos = k // length, k % length
            if k_segment == 0:
                allowed[:, q, k] = text_mask[:, k_pos] & (k_pos <= q_pos)
            else:
                allowed[:, q, k] = (k_pos == q_pos) and (k_segment <= q_segment)
    scores = (query @ key.transpose(-1, -2)) * scaling
    probs = torch.softmax(scores.masked_fill(~allowed[:, None], float("-inf")), dim=-1)
    return (probs @ value).transpose(1, 2)


def kernel_output(backend, query, key, value, text_mask, layout, scaling):
    """Run one thought-attention kernel through the dispatcher that transformers calls."""
    attention = AttentionInterface._global_mapping["quietstar_sdpa"]
    module = torch.nn.Module()
    module.scaling, module.training = scaling, False
    layout = ThoughtLayout(layout.length, layout.first_query_segment, backend)
    s_q, s_k = query.shape[2] // layout.length, key.shape[2] // layout.length
    mask = thought_attention_mask(text_mask, layout, s_q, s_k)
    out, _ = attention(module, query, key, value, mask, scaling=scaling, thought_layout=layout)
    return out


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("backend", ["cpu_flash", "torch", "flex"])
@pytest.mark.parametrize("first_segment,q_segments,k_segments", [(0, 4, 4), (3, 1, 4), (1, 1, 2)])
def test_thought_attention_kernels_match_a_dense_mask(backend, first_segment, q_segments, k_segments):
    g = torch.Generator().manual_seed(0)
    length, n, heads, kv_heads, dim = 5, 2, 4, 2, 8
    layout = ThoughtLayout(length, first_segment, "dense")
    inputs = [
        torch.randn(n, heads, q_segments * length, dim, generator=g),
        torch.randn(n, kv_heads, k_segments * length, dim, generator=g),
        torch.randn(n, kv_heads, k_segments * length, dim, generator=g),
    ]
    text_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)  # right padded
    real = text_mask[:, None, :].expand(n, q_segments, length).reshape(n, -1)  # queries at real positions
    weights = torch.randn(n, q_segments * length, heads, dim, generator=g)

    def run(fn):
        leaves = [x.clone().requires_grad_(backend != "flex") for x in inputs]
        out = fn(*leaves)
        if backend != "flex":  # FlexAttention has no CPU backward
            (out * weights)[real].sum().backward()
        return out[real], [x.grad for x in leaves]

    expected, expected_grads = run(lambda q, k, v: dense_reference(q, k, v, text_mask, layout, 0.3))
    got, grads = run(lambda q, k, v: kernel_output(backend, q, k, v, text_mask, layout, 0.3))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if backend != "flex":
        for name, grad, ref in zip("qkv", grads, expected_grads):
            torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("length,q_segments,k_segments,first_segment,block", [
    (13, 3, 3, 0, 8), (16, 2, 5, 3, 8), (7, 4, 4, 0, 4), (20, 1, 1, 0, 8), (9, 1, 6, 5, 4), (32, 3, 3, 0, 16)])
def test_the_block_mask_has_the_tiles_of_a_dense_evaluation(length, q_segments, k_segments, first_segment, block):
    """thought_block_mask builds its tiles from the rule's structure; create_block_mask evaluates the rule densely."""
    from torch.nn.attention.flex_attention import create_block_mask

    text_mask = torch.ones(3, length, dtype=torch.bool)
    text_mask[1, :3] = False  # left padded
    text_mask[2, -5:] = False  # right padded
    ours = thought_block_mask(text_mask, ThoughtLayout(length, first_segment, "flex"), q_segments, k_segments, block)
    dense = create_block_mask(lambda b, h, q, k: dense_rule(b, q, k, text_mask, length, first_segment), 3, None,
                              q_segments * length, k_segments * length, device="cpu", BLOCK_SIZE=block)

    def tiles(mask, full):
        counts = mask.full_kv_num_blocks if full else mask.kv_num_blocks
        index = mask.full_kv_indices if full else mask.kv_indices
        return [[sorted(index[b, 0, i, :counts[b, 0, i]].tolist()) for i in range(counts.shape[-1])] for b in range(3)]

    assert tiles(ours, full=False) == tiles(dense, full=False)
    assert tiles(ours, full=True) == tiles(dense, full=True)
    assert int(ours.kv_num_blocks.sum()) > 0
    if length % block == 0:  # whole text tiles under the diagonal: full ones occur
        assert int(ours.full_kv_num_blocks.sum()) > 0


def dense_rule(b, q, k, text_mask, length, first_segment):
    """The diagonal rule for index tensors, written apart from the library's mask_mod."""
    q_segment, q_pos, k_segment, k_pos = q // length + first_segment, q % length, k // length, k % length
    return torch.where(k_segment == 0, (k_pos <= q_pos) & text_mask[b, k_pos], (k_pos == q_pos) & (k_segment <= q_segment))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("backend", ["flex", "cpu_flash"])
def test_every_backend_gives_the_torch_backend_step(backend):
    settings = dict(thought_len=3, n_true=2)
    reference = trained_looking_model("llama", "efficient", attention_backend="torch", **settings)
    model = trained_looking_model("llama", "efficient", attention_backend=backend, **settings)
    ids, mask = padded_batch(lengths=(8, 5))
    thoughts = reference.sample_thoughts(ids, mask, generator=torch.Generator().manual_seed(0))
    greedy = reference.sample_thoughts(ids, mask, greedy=True)
    assert torch.equal(model.sample_thoughts(ids, mask, greedy=True)[mask.bool()], greedy[mask.bool()])
    if backend == "flex":  # FlexAttention has no CPU backward: compare the forward
        with torch.no_grad():
            expected, got = reference(ids, mask, thoughts=thoughts), model(ids, mask, thoughts=thoughts)
        for name in WELL_CONDITIONED + ("policy_loss",):
            close(getattr(got, name), getattr(expected, name), name, scale=1e-1)
        return
    with torch.no_grad():
        thought_logprobs = reference.rollout(ids, mask, thoughts=thoughts)[1].thought_logprobs
    assert_same_step(step(reference, ids, mask, thoughts), step(model, ids, mask, thoughts), thought_logprobs)


def test_compiled_flex_attention_keeps_a_few_graphs_as_thoughts_grow(monkeypatch, thought_len=16):
    """The key length grows with every thought step; the compiled FlexAttention must not make a graph per
    length, or past torch's recompile limit it silently falls back to the eager version (every score
    materialised). Dynamo's graphs are counted with its ``eager`` backend, which compiles nothing."""
    from torch._dynamo.utils import counters

    import quietstar.quiet_star.thought_attention as thought_attention

    monkeypatch.setattr(thought_attention, "flex_attention_kernel", lambda device: thought_attention.compiled_flex_attention("eager"))
    torch._dynamo.reset()
    counters.clear()
    settings = dict(thought_len=thought_len, n_true=4)
    reference = trained_looking_model("llama", "efficient", attention_backend="torch", **settings)
    model = trained_looking_model("llama", "efficient", attention_backend="flex", **settings)
    ids, mask = padded_batch(lengths=(16, 12))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="flex_attention called without torch.compile")  # the eager fallback
        with torch.no_grad():
            thoughts = reference.sample_thoughts(ids, mask, generator=torch.Generator().manual_seed(0))
            greedy = model.sample_thoughts(ids, mask, greedy=True)
            got = model(ids, mask, thoughts=thoughts)
    assert counters["stats"]["unique_graphs"] <= 4  # one length, then symbolic lengths (and block-mask shapes)
    with torch.no_grad():
        expected = reference(ids, mask, thoughts=thoughts)
    assert torch.equal(greedy[mask.bool()], reference.sample_thoughts(ids, mask, greedy=True)[mask.bool()])
    for name in WELL_CONDITIONED + ("policy_loss",):
        close(getattr(got, name), getattr(expected, name), name, scale=1e-1)
    torch._dynamo.reset()


def test_auto_backend_picks_by_device_and_bad_choices_fail():
    assert resolve_backend("auto", torch.device("cpu")) == "cpu_flash"
    assert resolve_backend("auto", torch.device("cuda")) == "flex"
    assert resolve_backend("auto", torch.device("mps")) == "torch"
    with pytest.raises(ValueError, match="cpu_flash thought attention backend runs on the CPU only"):
        resolve_backend("cpu_flash", torch.device("cuda"))
    with pytest.raises(ValueError, match="unknown thought attention backend"):
        resolve_backend("xformers", torch.device("cpu"))
