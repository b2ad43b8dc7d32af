"""Benchmark cases of attnkit inside Hugging Face transformers (issue 13): a whole model, not one attention call.

A Mistral-shaped model (random weights from a config, nothing downloaded): 8 layers, hidden 512, 8 query heads
and 2 key/value heads of 64, MLP 1024, vocabulary 1000, sliding window 256 (Mistral's 4096 scaled to a
CPU). Float32, batch 1 (``--quick``: 2 layers, hidden 64, window 16, L 512 / 256).

* ``hf-mistral-w256-prefill-L16384-fwd``: the forward over a 16,384-token prompt (``use_cache=False``,
  ``logits_to_keep=1``, as a prefill computes only the last logits), ``attn_implementation="attnkit"``
  against transformers' ``"sdpa"`` (which hands SDPA a 16,384 x 16,384 boolean mask per layer type);
* ``hf-mistral-w256-train-L8192-fwd+bwd``: one training step's forward and backward of the language-model loss
  at 8,192 tokens with attnkit, and transformers' ``"flex_attention"``, which refuses on a CPU (its error is
  shown: "FlexAttention does not support backward on CPU", measured with transformers 5.24 / torch 2.13).

Peak memory is the bench's usual measure (:mod:`attnkit.bench.timing`): a fresh child process per
implementation builds the model and the inputs, resets its resident-set high-water mark, runs one call and
reports ``VmHWM`` minus its resident set just before the call, so the weights are not counted and everything
the call allocates is.
"""

from __future__ import annotations

from attnkit.bench.anchors import AnchorUnavailable

_FLEX_REFUSES = ("transformers' flex_attention refuses: 'FlexAttention does not support backward on CPU. Please "
                 "set the input requires_grad to False or use another device.' (NotImplementedError)")


def _config(quick: bool):
    import transformers

    if quick:
        dims = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, sliding_window=16)
    else:
        dims = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=2, sliding_window=256)
    return transformers.MistralConfig(vocab_size=1000, max_position_embeddings=32768, pad_token_id=0,
                                      bos_token_id=1, eos_token_id=2, **dims)


def _model_factory(impl: str, L: int, mode: str, quick: bool):
    def make():
        try:
            import torch
            import transformers
        except ImportError as exc:
            raise AnchorUnavailable("transformers is not installed (pip install 'attnkit[hf]')") from exc
        if impl == "attnkit":
            from attnkit.integrations.transformers import register
            register()
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(_config(quick), attn_implementation=impl)
        ids = torch.randint(3, 1000, (1, L), generator=torch.Generator().manual_seed(1))
        if mode == "fwd":
            model.eval()

            def prefill():
                with torch.no_grad():
                    return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits
            return prefill
        model.train()

        def step():
            model.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            return loss
        return step
    return make


def _refused(reason: str):
    def make():
        raise AnchorUnavailable(reason)
    return make


def hf_cases(quick: bool):
    """The issue-13 cases (see the module docstring)."""
    from attnkit.bench.cases import Case

    cfg = dict(layers=2, d=64, w=16) if quick else dict(layers=8, d=512, w=256)
    Lp, Lt = (512, 256) if quick else (16384, 8192)
    w = cfg["w"]
    shape = f"{cfg['layers']} layers, d={cfg['d']}, window {w}, GQA 8/2 heads of 64, float32, B=1"
    return [
        Case(f"hf-mistral-w{w}-prefill-L{Lp}-fwd", "hf-mistral-prefill", Lp, "fwd",
             {"attnkit": _model_factory("attnkit", Lp, "fwd", quick),
              "sdpa": _model_factory("sdpa", Lp, "fwd", quick)},
             None, "window", memory=("attnkit", "sdpa"), role="hf_prefill",
             note=f"transformers MistralForCausalLM ({shape}), prefill forward; attnkit = "
                  "set_attn_implementation('attnkit'), sdpa = transformers' sdpa (dense L x S boolean mask)"),
        Case(f"hf-mistral-w{w}-train-L{Lt}-fwd+bwd", "hf-mistral-train", Lt, "fwd+bwd",
             {"attnkit": _model_factory("attnkit", Lt, "fwd+bwd", quick), "flex": _refused(_FLEX_REFUSES)},
             None, "window", memory=("attnkit",), role="hf_train",
             note=f"transformers MistralForCausalLM ({shape}), LM loss forward+backward"),
    ]
