"""attnkit as transformers' attention implementation, proved on the library's own model code (random weights
from tiny configs, nothing downloaded) against transformers' ``eager`` implementation (its plain equations).

Positions that are padding are compared only where they mean something: a padded query row sees no key, which
attnkit defines as a zero output and eager as a uniform average, so logits are compared on real tokens."""

import pytest

transformers = pytest.importorskip(
    "transformers", reason="transformers is the optional attnkit[hf] extra (make test installs it)")

import torch  # noqa: E402

import attnkit.integrations.transformers as ak  # noqa: E402
from attnkit import functional, masks  # noqa: E402
from attnkit.kernels import dispatch  # noqa: E402

V, L, WINDOW = 100, 24, 8
TOL = 1e-4


def _config(arch: str, **over):
    t = transformers
    common = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        cfg = t.LlamaConfig(**common, num_key_value_heads=2)
    elif arch == "mistral":
        cfg = t.MistralConfig(**common, num_key_value_heads=2, sliding_window=WINDOW)
    elif arch == "qwen2":
        cfg = t.Qwen2Config(**common, num_key_value_heads=1)
    elif arch == "gemma2":  # alternating sliding / full layers, attention and final soft-caps
        cfg = t.Gemma2Config(**common, num_key_value_heads=2, head_dim=16, sliding_window=WINDOW,
                             attn_logit_softcapping=5.0, final_logit_softcapping=30.0, query_pre_attn_scalar=16)
    elif arch == "gpt2":
        cfg = t.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=1,
                           eos_token_id=2, pad_token_id=0, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    elif arch == "bert":
        cfg = t.BertConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=256, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
    else:
        raise AssertionError(arch)
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def _model(arch: str, **over):
    torch.manual_seed(0)
    cfg = _config(arch, **over)
    if arch == "bert":
        return transformers.BertModel(cfg, add_pooling_layer=False).eval()
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


def _out(model, **inputs):
    out = model(**inputs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits


def _both(model, **inputs):
    """(eager, attnkit) outputs of the same weights on the same inputs."""
    model.set_attn_implementation("eager")
    ref = _out(model, **inputs)
    model.set_attn_implementation("attnkit")
    return ref, _out(model, **inputs)


@pytest.fixture(scope="module", autouse=True)
def registered():
    ak.register()


ARCHS = ["llama", "mistral", "qwen2", "gemma2", "bert", "gpt2"]
DECODERS = [a for a in ARCHS if a != "bert"]


def _padded(side: str, B: int = 3, n: int = L):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (B, n), generator=g)
    keep = torch.ones(B, n, dtype=torch.long)
    for b, pad in enumerate((0, 5, 11)[:B]):
        if side == "left":
            keep[b, :pad] = 0
        else:
            keep[b, n - pad:] = 0
    return ids, keep


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_eager_with_padding(arch, side):
    model = _model(arch)
    ids, keep = _padded(side)
    assert (keep == 0).any() and (keep == 1).any()
    with torch.no_grad():
        ref, out = _both(model, input_ids=ids, attention_mask=keep)
    real = keep.bool()
    assert (ref - out)[real].abs().max() <= TOL


@pytest.mark.parametrize("arch", DECODERS)
def test_packed_sequences_match_eager(arch):
    """Three documents in one row, position ids restarting: each document sees only itself."""
    model = _model(arch)
    ids = torch.randint(3, V, (1, L), generator=torch.Generator().manual_seed(2))
    pos = torch.cat([torch.arange(n) for n in (11, 9, 4)])[None]  # (1, L)
    with torch.no_grad():
        ref, out = _both(model, input_ids=ids, position_ids=pos, use_cache=False)
        alone = _out(model, input_ids=ids[:, 11:20], position_ids=pos[:, 11:20], use_cache=False)
    assert (ref - out).abs().max() <= TOL
    assert (out[:, 11:20] - alone).abs().max() <= TOL  # the packing is real: the middle document alone


@pytest.mark.parametrize("arch", DECODERS)
def test_generate_with_kv_cache_gives_eager_tokens(arch):
    model = _model(arch)
    ids, keep = _padded("left", B=2, n=12)
    kw = dict(max_new_tokens=12, do_sample=False, min_new_tokens=12, pad_token_id=0)
    with torch.no_grad():
        model.set_attn_implementation("eager")
        ref = model.generate(input_ids=ids, attention_mask=keep, **kw)
        model.set_attn_implementation("attnkit")
        out = model.generate(input_ids=ids, attention_mask=keep, **kw)
    assert out.shape[1] == 24 > WINDOW  # decoding went past the window
    assert torch.equal(ref, out)


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_in_training_mode_match_eager(arch):
    model = _model(arch).train()
    ids, keep = _padded("right", B=2)
    grads = []
    for impl in ("eager", "attnkit"):
        model.set_attn_implementation(impl)
        model.zero_grad()
        out = _out(model, input_ids=ids, attention_mask=keep)
        (out * keep[..., None]).pow(2).mean().backward()  # real tokens only (see the module docstring)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    ref, got = grads
    assert ref.keys() == got.keys() and len(ref) > 10
    for name in ref:
        scale = ref[name].abs().max().clamp_min(1e-3)
        assert ((ref[name] - got[name]).abs().max() / scale) <= 1e-4, name


def _spy(monkeypatch):
    """Record the mask and the kernel of every attnkit attention call."""
    seen = []
    real_attention, real_choose = functional.attention, dispatch.choose

    def attention(*args, **kwargs):
        seen.append({"mask": kwargs.get("mask")})
        return real_attention(*args, **kwargs)

    def choose(*args, **kwargs):
        name = real_choose(*args, **kwargs)
        seen[-1]["kernel"] = name
        return name

    monkeypatch.setattr(functional, "attention", attention)
    monkeypatch.setattr(dispatch, "choose", choose)
    return seen


def test_sliding_window_mask_reaches_attnkit_structured(monkeypatch):
    """Mistral's sliding layers hand attnkit a window mask (no L x S tensor), and at a length where the
    structured kernels pay off they run on them: the window kernel alone, the banded one with padding."""
    model = _model("mistral")
    n = 256
    ids = torch.randint(3, V, (2, n), generator=torch.Generator().manual_seed(3))
    keep = torch.ones(2, n, dtype=torch.long)
    keep[1, :40] = 0  # left padding
    # a kernel that costs what the band covers (the compiled one where it is built, else window / banded)
    sparse = {"native", "window", "banded", "blocksparse"}
    for inputs in (dict(input_ids=ids), dict(input_ids=ids, attention_mask=keep)):
        with torch.no_grad():
            model.set_attn_implementation("eager")
            ref = _out(model, **inputs, use_cache=False)
            seen = _spy(monkeypatch)
            model.set_attn_implementation("attnkit")
            out = _out(model, **inputs, use_cache=False)
            monkeypatch.undo()
        real = inputs.get("attention_mask", torch.ones(2, n)).bool()
        assert (ref - out)[real].abs().max() <= TOL
        assert len(seen) == 2  # one call per layer
        for call in seen:
            mask = call["mask"]
            assert isinstance(mask, masks.Mask) and not isinstance(mask, masks.Dense)
            assert mask.band() == (WINDOW - 1, 0)  # the query and the 7 keys before it
            assert call["kernel"] in sparse, call["kernel"]


def test_padding_and_offsets_become_structured_masks():
    """The mask function's answers, compared with transformers' own sdpa mask on every pair."""
    from transformers import masking_utils as mu

    keep = torch.ones(2, 20, dtype=torch.bool)
    keep[0, :3] = False  # left padding
    holes = keep.clone()
    holes[1, 7] = False  # a hole: stays a per-key vector
    cases = [  # (mask_function, attention_mask, L, S, q_offset, kv_offset, expected type)
        (mu.causal_mask_function, keep, 20, 20, 0, 0, masks.And),
        (mu.sliding_window_causal_mask_function(5), None, 20, 20, 0, 0, masks.Window),
        (mu.sliding_window_causal_mask_function(5), keep, 1, 20, 19, 0, masks.And),  # decoding step
        (mu.sliding_window_causal_mask_function(5), None, 3, 8, 14, 9, masks.Window),  # a cache holding 8 keys
        (mu.sliding_window_causal_mask_function(5), keep, 3, 8, 14, 5, masks.Offset),  # not the last keys
        (mu.bidirectional_mask_function, holes, 20, 20, 0, 0, masks.Dense),
        (mu.sliding_window_bidirectional_mask_function(3), None, 20, 20, 0, 0, masks.Window),
        (mu.chunked_causal_mask_function(4, torch.zeros(2, dtype=torch.long)), None, 20, 20, 0, 0, masks.MaskMod),
    ]
    for fn, am, Lq, S, q0, k0, kind in cases:
        ref = mu.sdpa_mask(2, Lq, S, q0, k0, mask_function=fn, attention_mask=am, allow_is_causal_skip=False)
        got = ak.attnkit_mask(2, Lq, S, q0, k0, mask_function=fn, attention_mask=am)
        assert isinstance(got, kind), (got, kind)
        dense = masks.materialize(got, Lq, S, batch_ndim=2)  # (B | 1, 1, L, S)
        assert torch.equal(dense.expand(2, 1, Lq, S), ref.expand(2, 1, Lq, S)), got
        assert ref.any() and not ref.all()


def test_output_attentions_returns_the_weights():
    model = _model("llama")
    ids, keep = _padded("right")
    with torch.no_grad():
        model.set_attn_implementation("eager")
        ref = model(input_ids=ids, attention_mask=keep, output_attentions=True).attentions
        model.set_attn_implementation("attnkit")
        got = model(input_ids=ids, attention_mask=keep, output_attentions=True).attentions
        plain = model(input_ids=ids, attention_mask=keep)
    assert len(got) == len(ref) == 2 and plain.attentions is None
    real = keep.bool()[:, None, :, None]  # real query rows
    for r, g in zip(ref, got, strict=True):
        assert g.shape == r.shape == (3, 4, L, L)
        assert ((r - g).abs() * real).max() <= TOL


def test_dropout_is_applied_in_training_only():
    model = _model("llama", attention_dropout=0.5)
    model.set_attn_implementation("attnkit")
    ids = torch.randint(3, V, (1, L), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        e1, e2 = _out(model, input_ids=ids), _out(model, input_ids=ids)
        model.train()
        torch.manual_seed(5)
        t1 = _out(model, input_ids=ids)
        torch.manual_seed(5)
        t2 = _out(model, input_ids=ids)
        t3 = _out(model, input_ids=ids)
    assert torch.equal(e1, e2) and torch.equal(t1, t2)  # eval deterministic, training seeded
    assert (t1 - e1).abs().max() > 1e-3 and (t3 - t1).abs().max() > 1e-3


def _gpt_oss():
    cfg = transformers.GptOssConfig(vocab_size=V, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=2,
                                    num_experts_per_tok=1, sliding_window=WINDOW, max_position_embeddings=256,
                                    pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 2.0)  # sinks that matter
    return model


def test_attention_sinks_honoured_for_inference_and_refused_for_training():
    model = _gpt_oss()
    ids, keep = _padded("left")
    with torch.no_grad():
        ref, out = _both(model, input_ids=ids, attention_mask=keep)
    assert (ref - out)[keep.bool()].abs().max() <= TOL
    model.train()
    with pytest.raises(ValueError, match="sinks"):
        _out(model, input_ids=ids, attention_mask=keep)


def test_an_unknown_mask_is_a_clear_error():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="attention_mask must be an attnkit Mask"):
        ak.attnkit_attention_forward(torch.nn.Module(), q, q, q, attention_mask=[1, 2])
