"""flashjit.integrations.transformers: attn_implementation="fjit" in tiny random-init models built from
configs (no downloads): Llama, Mistral (sliding window), Gemma2 (softcap, sliding window), Qwen2 (GQA 7:1),
gpt-oss (sinks), Llama4 (chunked attention) and ModernBERT (an encoder: non-causal, bidirectional
sliding window).

The rule (numerics.assert_close): flashjit's bf16 error against the same weights in fp32 eager is at most
2x that of transformers' own bf16 attention (SDPA; eager for softcap and sinks, which SDPA lacks) + a floor
relative to the reference's magnitude. The reference backend runs on CPU; the jit parameters run the
same tests on the kernels on a GPU (marked gpu). Padded batches need flashjit.flash_attn_varlen_func:
without it they must raise; the integration's unpadding is also tested on a per-sequence stand-in for it.
"""
import copy
import inspect

import pytest
import torch

pytest.importorskip("transformers", minversion="5", reason="transformers>=5 is not installed "
                                                           "(pip install 'flashjit[transformers]')")

from numerics import assert_close  # noqa: E402
from transformers import (AutoModel, AutoModelForCausalLM, AttentionInterface, Gemma2Config,  # noqa: E402
                          GptOssConfig, Llama4TextConfig, LlamaConfig, MistralConfig,
                          ModernBertConfig, Qwen2Config)
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function  # noqa: E402
from transformers.utils.generic import is_flash_attention_requested  # noqa: E402

import flashjit  # noqa: E402
from flashjit.integrations import transformers as fjt  # noqa: E402

NAME = fjt.register()
VOCAB = 256
# initializer_range 0.1 (not 0.02): scores far from uniform, so windows, softcap and masks matter.
# Token 0 is padding only (the inputs are drawn from 1..VOCAB-1).
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, initializer_range=0.1,
             pad_token_id=0)
CONFIGS = {
    "llama": lambda: LlamaConfig(**SMALL, num_attention_heads=4, num_key_value_heads=4),
    "mistral": lambda: MistralConfig(**SMALL, num_attention_heads=4, num_key_value_heads=2, sliding_window=8),
    "gemma2": lambda: Gemma2Config(**SMALL, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   sliding_window=8, attn_logit_softcapping=3.0, query_pre_attn_scalar=16),
    "qwen2": lambda: Qwen2Config(**{**SMALL, "hidden_size": 112}, num_attention_heads=14, num_key_value_heads=2),
    "gpt_oss": lambda: GptOssConfig(**{**SMALL, "intermediate_size": 64}, num_attention_heads=4, num_key_value_heads=2,
                                    head_dim=16, sliding_window=8, num_local_experts=2, num_experts_per_tok=1),
}
EAGER_BASELINE = ("gemma2", "gpt_oss")  # softcap, sinks: transformers' SDPA path has neither
BACKENDS = [pytest.param("reference"),
            pytest.param("jit", marks=[pytest.mark.gpu, pytest.mark.skipif(
                not torch.cuda.is_available(), reason="the jit backend needs a CUDA GPU")])]


@pytest.fixture(params=BACKENDS)
def device(request, monkeypatch):
    monkeypatch.setenv("FLASHJIT_BACKEND", request.param)
    return "cpu" if request.param == "reference" else "cuda"


@pytest.fixture(params=["flashjit", "standin"])
def varlen(request, monkeypatch):
    """flashjit's flash_attn_varlen_func, and a stand-in for it: a loop of flash_attn_func calls, one per
    sequence, which tests the integration's unpadding (indices, cu_seqlens, windows) on its own, also
    in a flashjit without varlen."""
    if request.param == "flashjit":
        if fjt.varlen_func() is None:
            pytest.skip("this flashjit has no flash_attn_varlen_func")
        return
    dense = flashjit.flash_attn_func

    def standin(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kwargs):
        assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32 and len(cu_seqlens_q) == len(cu_seqlens_k)
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        assert max_seqlen_q == max(b - a for a, b in zip(cq, cq[1:]))
        assert max_seqlen_k == max(b - a for a, b in zip(ck, ck[1:]))
        return torch.cat([dense(q[None, cq[i]:cq[i + 1]], k[None, ck[i]:ck[i + 1]], v[None, ck[i]:ck[i + 1]],
                                **kwargs)[0] for i in range(len(cq) - 1)])

    monkeypatch.setattr(flashjit, "flash_attn_varlen_func", standin, raising=False)


def models(config, device, auto=AutoModelForCausalLM):
    """(fp32 eager reference, bf16 baseline, bf16 flashjit) with one set of weights. Each gets a copy of
    the config: from_config writes the attention implementation into the config it is given."""
    baseline = "eager" if config.model_type in EAGER_BASELINE else "sdpa"
    ref = auto.from_config(copy.deepcopy(config), attn_implementation="eager")
    result = [ref.to(device).eval()]
    for implementation in (baseline, NAME):
        model = auto.from_config(copy.deepcopy(config), attn_implementation=implementation)
        model.load_state_dict(ref.state_dict())
        result.append(model.to(device=device, dtype=torch.bfloat16).eval())
    assert result[2].config._attn_implementation == NAME
    return result


def run(model, ids, **kwargs):
    """Logits (fp32) and the gradient of every parameter (one flat fp32 vector) of a training step on ids."""
    model.zero_grad()
    labels = ids
    if "attention_mask" in kwargs:  # label j is predicted at position j - 1: both must be real tokens
        real = kwargs["attention_mask"].bool()
        labels = ids.masked_fill(~(real & real.roll(1, 1)), -100)
    out = model(ids, labels=labels, use_cache=False, **kwargs)
    out.loss.backward()
    return out.logits.detach().float(), torch.cat([p.grad.float().flatten() for p in model.parameters()])


def check(name, results, where=None):
    """results: (ref, baseline, flashjit) tuples of tensors; where: a mask of the positions to compare."""
    (ref, low, ours) = results
    for i, what in enumerate(("logits", "gradients")[:len(ref)]):
        pick = (lambda t: t[where]) if where is not None and i == 0 else (lambda t: t)
        assert_close(f"{name} {what}", pick(ours[i]), pick(ref[i]), pick(low[i]))


def padded(batch, seqlen, device):
    """ids and a mask: row 0 left-padded by 5, row 1 right-padded by 4, the others full."""
    ids = torch.randint(1, VOCAB, (batch, seqlen), device=device)
    mask = torch.ones(batch, seqlen, dtype=torch.long, device=device)
    mask[0, :5], mask[1, seqlen - 4:] = 0, 0
    return ids.masked_fill(mask == 0, 0), mask


def cache_kwarg(model):
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def test_register_avoids_transformers_flash_path(tmp_path):
    assert NAME == "fjit" and not is_flash_attention_requested(requested_attention_implementation=NAME)
    assert AttentionInterface()[NAME] is fjt.attention_forward and ALL_MASK_ATTENTION_FUNCTIONS[NAME] is fjt.build_mask
    for bad in ("my_flash", "sdpa_fast", "org/kernel"):
        with pytest.raises(ValueError, match="choose another"):
            fjt.register(bad)
    AutoModelForCausalLM.from_config(CONFIGS["llama"]()).save_pretrained(tmp_path)  # from_pretrained too
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the kernels take CUDA bf16/fp16 tensors
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=NAME, dtype=torch.bfloat16).to(dev)
    assert model.config._attn_implementation == NAME
    assert torch.isfinite(model(torch.randint(1, VOCAB, (1, 9), device=dev)).logits).all()


@pytest.mark.parametrize("arch", CONFIGS)
def test_logits_and_gradients(arch, device):
    ref, low, ours = models(CONFIGS[arch](), device)
    ids = torch.randint(1, VOCAB, (2, 24), device=device)  # 24 > sliding window 8
    check(arch, [run(m, ids) for m in (ref, low, ours)])


@pytest.mark.parametrize("arch", CONFIGS)
def test_generate_with_kv_cache(arch, device):
    """Greedy decoding with the KV cache (queries of length 1 against a longer cache, past the sliding
    window; a static cache's unfilled slots cropped), then a chunk of queries against a cache: both
    bottom-right causal, no mask."""
    ref, low, ours = models(CONFIGS[arch](), device)
    prompt = torch.randint(1, VOCAB, (2, 12), device=device)
    with torch.no_grad():
        for cache in ("dynamic", "static"):
            out = ours.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True, output_logits=True,
                                return_dict_in_generate=True, pad_token_id=0, cache_implementation=cache)
            seq = out.sequences  # each step's logits, teacher-forced through the fp32 and bf16 models
            expect = [m(seq, use_cache=False).logits.float() for m in (ref, low)]
            check(f"{arch} generate {cache}",
                  [(e[:, 11:-1],) for e in expect] + [(torch.stack(out.logits, 1).float(),)])
        cache = ours(seq[:, :10], use_cache=True).past_key_values
        chunk = ours(seq[:, 10:], **{cache_kwarg(ours): cache}).logits.float()
        check(f"{arch} chunk after cache", [(e[:, 10:],) for e in expect] + [(chunk,)])


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_padded_batch(arch, device, monkeypatch):
    """With flashjit.flash_attn_varlen_func: as SDPA on the real tokens; without: a clear error."""
    ref, low, ours = models(CONFIGS[arch](), device)
    ids, mask = padded(3, 20, device)
    if fjt.varlen_func() is not None:
        check(f"{arch} padded", [run(m, ids, attention_mask=mask) for m in (ref, low, ours)], mask.bool())
    monkeypatch.setattr(fjt, "varlen_func", lambda: None)  # as in a flashjit without varlen
    with pytest.raises(NotImplementedError, match="flash_attn_varlen_func"):
        ours(ids, attention_mask=mask)


@pytest.mark.parametrize("arch", CONFIGS)
def test_unpadding(arch, device, varlen):
    """Padded batches (training step), packed sequences (position_ids restarting, no mask), left-padded
    generate and generate with a static cache (its unfilled slots cropped)."""
    ref, low, ours = models(CONFIGS[arch](), device)
    ids, mask = padded(3, 20, device)
    check(f"{arch} padded", [run(m, ids, attention_mask=mask) for m in (ref, low, ours)], mask.bool())

    packed = torch.randint(1, VOCAB, (1, 22), device=device)
    positions = torch.cat([torch.arange(n, device=device) for n in (9, 4, 9)])[None]  # three sequences
    check(f"{arch} packed", [run(m, packed, position_ids=positions) for m in (ref, low, ours)])

    prompt, prompt_mask = ids[2:].repeat(2, 1), mask[2:].repeat(2, 1)
    prompt_mask[0, :6] = 0  # left padding, as generate wants it
    prompt = prompt.masked_fill(prompt_mask == 0, 0)
    for cache in ("dynamic", "static"):
        with torch.no_grad():
            out = ours.generate(prompt, attention_mask=prompt_mask, max_new_tokens=4, do_sample=False,
                                output_logits=True, return_dict_in_generate=True, pad_token_id=0,
                                cache_implementation=cache)
            full = torch.cat([prompt_mask, torch.ones_like(out.sequences[:, 20:])], 1)
            positions = (full.cumsum(-1) - 1).masked_fill(full == 0, 0)  # generate's own position ids
            expect = [m(out.sequences, attention_mask=full, position_ids=positions, use_cache=False).logits[:, 19:-1]
                      for m in (ref, low)]
        check(f"{arch} generate {cache}", [(e.float(),) for e in expect] + [(torch.stack(out.logits, 1).float(),)])


def test_encoder_bidirectional_sliding_window(device, varlen):
    """ModernBERT: non-causal modules with a bidirectional sliding window (transformers' flash convention,
    window (W - 1, W - 1) for the module's W), unpadded (flash_attn_func) and padded (varlen)."""
    config = ModernBertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                              num_attention_heads=4, local_attention=8, global_attn_every_n_layers=3,
                              initializer_range=0.1, pad_token_id=0)
    ref, low, ours = models(config, device, auto=AutoModel)
    ids, mask = padded(3, 24, device)
    for kwargs, where in (({}, None), ({"attention_mask": mask}, mask.bool())):
        with torch.no_grad():
            results = [(m(ids, **kwargs).last_hidden_state.float(),) for m in (ref, low, ours)]
        check("modernbert" + (" padded" if kwargs else ""), results, where)


def test_chunked_attention(device, varlen):
    """Llama4's chunked layers: each chunk of 6 tokens is a sequence of its own (found by build_mask on
    the model's mask function), in training, prefill and decoding across chunk boundaries."""
    config = Llama4TextConfig(**{**SMALL, "intermediate_size": 64}, intermediate_size_mlp=64, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, num_local_experts=2, attention_chunk_size=6)
    ref, low, ours = models(config, device)
    ids = torch.randint(1, VOCAB, (2, 20), device=device)
    check("llama4", [run(m, ids) for m in (ref, low, ours)])
    with torch.no_grad():
        out = ours.generate(ids[:, :10], max_new_tokens=4, do_sample=False, output_logits=True,
                            return_dict_in_generate=True, pad_token_id=0)
        expect = [m(out.sequences, use_cache=False).logits[:, 9:-1].float() for m in (ref, low)]
    check("llama4 generate", [(e,) for e in expect] + [(torch.stack(out.logits, 1).float(),)])


def test_dropout_only_in_training(monkeypatch):
    monkeypatch.setenv("FLASHJIT_BACKEND", "reference")
    seen = []
    dense = flashjit.flash_attn_func
    monkeypatch.setattr(flashjit, "flash_attn_func", lambda *a, **k: seen.append(k["dropout_p"]) or dense(*a, **k))
    config = LlamaConfig(**SMALL, num_attention_heads=4, attention_dropout=0.25)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=NAME)
    ids = torch.randint(1, VOCAB, (1, 8))
    model.train()(ids, use_cache=False)
    model.eval()(ids, use_cache=False)
    assert seen == [0.25, 0.25, 0.0, 0.0]


def test_masks_it_cannot_express_are_refused():
    kw = dict(batch_size=2, q_length=6, kv_length=6, mask_function=causal_mask_function)
    assert fjt.build_mask(**kw) is None
    with pytest.raises(NotImplementedError, match="overlays"):
        fjt.build_mask(**kw, use_vmap=True)
    with pytest.raises(NotImplementedError, match="see later"):
        fjt.build_mask(**{**kw, "mask_function": lambda b, h, q, kv: kv <= q + 1})
    q = torch.randn(2, 4, 6, 16)
    with pytest.raises(ValueError, match="4D"):
        fjt.attention_forward(torch.nn.Module(), q, q, q, torch.ones(2, 1, 6, 6, dtype=torch.bool))


def test_the_plain_causal_mask_needs_no_device_read(monkeypatch):
    """Without an attention_mask, masking_utils' own causal function (nothing wraps it: no packing) gives
    the unmasked path, and a static cache's ones, without the checks and their device sync; a wrapped
    function (packed sequences) still goes through them."""
    def no_checks(*args, **kwargs):
        raise AssertionError("the checks ran")
    monkeypatch.setattr(fjt.torch, "stack", no_checks)
    assert fjt.build_mask(batch_size=2, q_length=6, kv_length=6, mask_function=causal_mask_function) is None
    segments = fjt.build_mask(batch_size=2, q_length=1, kv_length=16, q_offset=torch.tensor(5),
                              mask_function=causal_mask_function)
    assert segments.dtype == torch.int32 and segments.tolist() == [[1] * 6] * 2
    with pytest.raises(AssertionError, match="the checks ran"):
        fjt.build_mask(batch_size=2, q_length=6, kv_length=6, mask_function=lambda b, h, q, kv: kv <= q)


def test_masks_for_padding_and_static_caches():
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, :2] = False
    segments = fjt.build_mask(batch_size=2, q_length=6, kv_length=6, mask_function=causal_mask_function,
                              attention_mask=mask)
    assert segments.tolist() == mask.int().tolist()
    # a static cache of 16 slots holding 5 tokens + 1 query: the 10 unfilled slots are cropped
    segments = fjt.build_mask(batch_size=2, q_length=1, kv_length=16, q_offset=torch.tensor(5),
                              mask_function=causal_mask_function, attention_mask=torch.ones(2, 6, dtype=torch.bool))
    assert segments.tolist() == [[1] * 6] * 2
    # bidirectional masks (create_bidirectional_mask passes allow_is_bidirectional_skip) keep every key slot
    segments = fjt.build_mask(batch_size=2, q_length=6, kv_length=6, attention_mask=mask,
                              allow_is_bidirectional_skip=True)
    assert segments.tolist() == mask.int().tolist()
