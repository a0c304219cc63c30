"""flash_attn_varlen_func with block_table (flashjit/varlen.py: _paged; the KV-cache kernels through
_paged_kernels, and the custom op paged_varlen_fwd under torch.compile): a variable-length batch over a
paged K/V cache, inference only.

Each test lays a packed batch's keys into shuffled pages (with spare pages no sequence owns and table
entries past a sequence's keys pointing anywhere) and checks the paged call against the dense varlen
call on the packed keys: on the reference backend (CPU, CI) and the kernels (GPU) against the fp32
reference per sequence. Also the argument checks."""
import itertools

import pytest
import torch

from flashjit.varlen import flash_attn_varlen_func
from numerics import assert_close, assert_lse_close, reference_and_low

gpu = pytest.mark.gpu
# (query lengths, key lengths): an empty query sequence, a sequence with no keys, Sq > Sk (causal rows
# that see nothing), a one-token decode-like query, several pages.
LENS = ([5, 0, 9, 1, 70], [33, 20, 0, 47, 130])


def _cu(lens, device):
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device)


def _paged(k, v, lens_k, page, spare=2, device="cpu"):
    """k/v [total_k, H_k, D] laid into [pages, page, H_k, D] caches page by page in a shuffled order,
    and the block_table [B, max_pages] (entries past a sequence's pages: any page)."""
    per_seq = [-(-n // page) for n in lens_k]
    width, total = max(max(per_seq), 1), sum(per_seq) + spare
    order = torch.randperm(total)
    k_cache = torch.randn(total, page, *k.shape[1:], dtype=k.dtype, device=device)
    v_cache = torch.randn(total, page, *v.shape[1:], dtype=v.dtype, device=device)
    table = torch.randint(0, total, (len(lens_k), width), dtype=torch.int32)
    start, used = 0, 0
    for b, n in enumerate(lens_k):
        for j in range(per_seq[b]):
            rows = slice(start + j * page, min(start + (j + 1) * page, start + n))
            target = int(order[used])
            count = rows.stop - rows.start
            k_cache[target, :count], v_cache[target, :count] = k[rows], v[rows]
            table[b, j] = target
            used += 1
        start += n
    return k_cache, v_cache, table.to(device)


def _batch(h, hk, d, dtype, device):
    lens_q, lens_k = LENS
    q = torch.randn(sum(lens_q), h, d, dtype=dtype, device=device)
    k = torch.randn(sum(lens_k), hk, d, dtype=dtype, device=device)
    v = torch.randn(sum(lens_k), hk, d, dtype=dtype, device=device)
    return q, k, v, _cu(lens_q, device), _cu(lens_k, device)


@pytest.mark.parametrize("page", [16, 48])
@pytest.mark.parametrize("causal", [False, True])
def test_reference_backend_reads_the_pages(page, causal, monkeypatch):
    monkeypatch.setenv("FLASHJIT_BACKEND", "reference")
    q, k, v, cu_q, cu_k = _batch(4, 2, 32, torch.float32, "cpu")
    k_cache, v_cache, table = _paged(k, v, LENS[1], page)
    args = (cu_q, cu_k, max(LENS[0]), max(LENS[1]))
    out = flash_attn_varlen_func(q, k_cache, v_cache, *args, causal=causal, softcap=2.0, block_table=table)
    torch.testing.assert_close(out, flash_attn_varlen_func(q, k, v, *args, causal=causal, softcap=2.0))
    # return_attn_probs: the lse [H, total_q] (+inf for rows that see no key) and an empty S_dmask, as dense
    got = flash_attn_varlen_func(q, k_cache, v_cache, *args, causal=causal, return_attn_probs=True, block_table=table)
    want = flash_attn_varlen_func(q, k, v, *args, causal=causal, return_attn_probs=True)
    assert got[1].shape == (4, q.shape[0]) and got[2].numel() == 0
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


# A decoding batch: one query a sequence (flash_attn_with_kvcache's kernels: GQA packing, split keys), with a
# sequence that has no keys and one long enough that the kernels split its keys over CTAs.
DECODE_LENS_K = [33, 0, 2000, 47, 130]


def _decode_batch(h, hk, d, dtype, device):
    q = torch.randn(len(DECODE_LENS_K), h, d, dtype=dtype, device=device)
    k, v = (torch.randn(sum(DECODE_LENS_K), hk, d, dtype=dtype, device=device) for _ in range(2))
    return q, k, v, _cu([1] * len(DECODE_LENS_K), device), _cu(DECODE_LENS_K, device)


# (A window wider than every key range and a right edge past the one query bound nothing: kvattn.forward_kvcache
# drops them, which keeps its GQA packing; the GPU test checks the masks stay the same.)
DECODE_FEATURES = [dict(causal=True), dict(causal=True, window_size=(40, 0)), dict(causal=True, window_size=(4096, 0)),
                   dict(window_size=(8, 3)), dict(softcap=3.0), dict(alibi=True), dict(sink=True)]


def _features(features, h, device):
    kwargs = {key: val for key, val in features.items() if key not in ("alibi", "sink")}
    if features.get("alibi"):
        kwargs["alibi_slopes"] = torch.rand(h, device=device)
    if features.get("sink"):
        kwargs["learnable_sink"] = torch.randn(h, device=device)
    return kwargs


def _spy_on_the_decoding_route(monkeypatch) -> list:
    """The calls the paged route makes to the kvcache reference (the decoding route's), recorded."""
    import flashjit.varlen as varlen

    calls, route = [], varlen.reference_kvcache_attention
    monkeypatch.setattr(varlen, "reference_kvcache_attention", lambda *a, **kw: calls.append(kw) or route(*a, **kw))
    return calls


@pytest.mark.parametrize("features", DECODE_FEATURES, ids=lambda f: "-".join(map(str, f.values())))
def test_reference_decoding_batch_matches_the_dense_call(features, monkeypatch):
    """max_seqlen_q == 1 takes flash_attn_with_kvcache's route (kvcache.reference_kvcache_attention on the
    reference backend, the kernels' contract): out and lse [H, total_q] as the dense varlen call's."""
    monkeypatch.setenv("FLASHJIT_BACKEND", "reference")
    calls = _spy_on_the_decoding_route(monkeypatch)
    h, hk = 8, 2
    q, k, v, cu_q, cu_k = _decode_batch(h, hk, 32, torch.float32, "cpu")
    k_cache, v_cache, table = _paged(k, v, DECODE_LENS_K, 16)
    kwargs = _features(features, h, "cpu")
    args = (cu_q, cu_k, 1, max(DECODE_LENS_K))
    got = flash_attn_varlen_func(q, k_cache, v_cache, *args, return_attn_probs=True, block_table=table, **kwargs)
    want = flash_attn_varlen_func(q, k, v, *args, return_attn_probs=True, **kwargs)
    assert len(calls) == 1, "a decoding batch takes the kvcache route"
    assert got[1].shape == (h, len(DECODE_LENS_K)) and got[1].is_contiguous()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_only_a_decoding_batch_takes_the_kvcache_route_and_its_offsets_are_checked(monkeypatch):
    monkeypatch.setenv("FLASHJIT_BACKEND", "reference")
    calls = _spy_on_the_decoding_route(monkeypatch)
    q, k, v, cu_q, cu_k = _batch(4, 2, 32, torch.float32, "cpu")
    k_cache, v_cache, table = _paged(k, v, LENS[1], 16)
    flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, max(LENS[0]), max(LENS[1]), block_table=table)
    assert not calls, "a batch with longer query rows keeps the varlen kernels"
    # The reference reads and checks the offsets on this route too (what the kernels cannot check).
    q, k, v, cu_q, cu_k = _decode_batch(4, 2, 32, torch.float32, "cpu")
    k_cache, v_cache, table = _paged(k, v, DECODE_LENS_K, 16)
    skewed = torch.tensor([0, 0, 2, 3, 4, 5], dtype=torch.int32)  # five rows, but a sequence of two
    with pytest.raises(ValueError, match="max_seqlen_q=1 is less than the longest sequence in cu_seqlens_q"):
        flash_attn_varlen_func(q, k_cache, v_cache, skewed, cu_k, 1, max(DECODE_LENS_K), block_table=table)
    with pytest.raises(ValueError, match="max_seqlen_k=10 is less than the longest sequence in cu_seqlens_k"):
        flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, 1, 10, block_table=table)


def test_paged_varlen_refuses_what_it_cannot_do(monkeypatch):
    monkeypatch.setenv("FLASHJIT_BACKEND", "reference")
    q, k, v, cu_q, cu_k = _batch(4, 2, 32, torch.float32, "cpu")
    k_cache, v_cache, table = _paged(k, v, LENS[1], 16)
    args = (cu_q, cu_k, max(LENS[0]), max(LENS[1]))
    with pytest.raises(ValueError, match="with block_table takes no dropout_p"):
        flash_attn_varlen_func(q, k_cache, v_cache, *args, dropout_p=0.1, block_table=table)
    with pytest.raises(ValueError, match="has no backward"):
        flash_attn_varlen_func(q.requires_grad_(), k_cache, v_cache, *args, block_table=table)
    q = q.detach()
    with pytest.raises(ValueError, match="page size .* multiple of 16"):
        flash_attn_varlen_func(q, k_cache[:, :8], v_cache[:, :8], *args, block_table=table)
    with pytest.raises(ValueError, match="block_table must be an int32 tensor of shape \\(5, max_pages\\)"):
        flash_attn_varlen_func(q, k_cache, v_cache, *args, block_table=table.long())
    wide = table[:, :1].expand(-1, 2**25 + 1)  # (2**25 + 1) * 16 slots a sequence: past 32-bit rows' 2**29
    with pytest.raises(ValueError, match="exceed what the kernels address"):
        flash_attn_varlen_func(q, k_cache, v_cache, *args, block_table=wide)
    with pytest.raises(ValueError, match="paged caches of one non-empty shape"):
        flash_attn_varlen_func(q, k_cache, v_cache[..., :16], *args, block_table=table)
    with pytest.raises(ValueError, match="k must be a tensor of 4 dims"):
        flash_attn_varlen_func(q, k, v, *args, block_table=table)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("page, d, features", [
    (16, 64, {}), (48, 128, dict(causal=True)), (256, 128, dict(causal=True, window_size=(40, 0))),
    (32, 96, dict(softcap=5.0)), (16, 128, dict(alibi=True)), (64, 64, dict(causal=True, sink=True))])
def test_kernels_match_the_reference_per_sequence(dtype, page, d, features):
    h, hk = 4, 2
    q, k, v, cu_q, cu_k = _batch(h, hk, d, dtype, "cuda")
    k_cache, v_cache, table = _paged(k, v, LENS[1], page, device="cuda")
    kwargs = _features(features, h, "cuda")
    with torch.no_grad():
        out, lse, _ = flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, max(LENS[0]), max(LENS[1]),
                                             block_table=table, return_attn_probs=True, **kwargs)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (h, q.shape[0])
    starts_q, starts_k = [0, *itertools.accumulate(LENS[0])], [0, *itertools.accumulate(LENS[1])]
    for b in range(len(LENS[0])):
        rows, keys = slice(starts_q[b], starts_q[b + 1]), slice(starts_k[b], starts_k[b + 1])
        if rows.stop == rows.start:
            continue
        (ref, ref_lse), (low, low_lse) = reference_and_low(q[rows][None], k[keys][None], v[keys][None], **kwargs)
        assert_close(f"sequence {b}", out[rows][None], ref, low)
        assert_lse_close(lse[:, rows][None], ref_lse, low_lse)


@pytest.mark.parametrize("decoding", [False, True], ids=["prefill", "decoding"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=gpu)])
def test_fullgraph_compile_matches_eager(device, decoding, monkeypatch):
    """Under torch.compile (fullgraph) the paged call is the custom op flashjit::paged_varlen_fwd (the
    reference on the CPU, the kernels on the GPU): the same out and lse as the eager call, no graph break."""
    if device == "cpu":
        monkeypatch.setenv("FLASHJIT_BACKEND", "reference")
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    lens_k = DECODE_LENS_K if decoding else LENS[1]
    q, k, v, cu_q, cu_k = (_decode_batch if decoding else _batch)(4, 2, 64, dtype, device)
    k_cache, v_cache, table = _paged(k, v, lens_k, 16, device=device)
    args = (q, k_cache, v_cache, cu_q, cu_k, 1 if decoding else max(LENS[0]), max(lens_k))

    def call(*a):
        out, lse, _ = flash_attn_varlen_func(*a, causal=True, window_size=(40, 0), return_attn_probs=True,
                                             block_table=table)
        return out, lse, flash_attn_varlen_func(*a, softcap=3.0, block_table=table)

    torch._dynamo.reset()
    with torch.no_grad():
        got, want = torch.compile(call, fullgraph=True)(*args), call(*args)
    for g, w in zip(got, want):  # the same kernels or reference either way
        torch.testing.assert_close(g, w, atol=0, rtol=0)


def test_opcheck_of_the_paged_op(monkeypatch):
    """torch.library.opcheck: flashjit::paged_varlen_fwd's schema, fake shapes and strides, and AOT dispatch
    agree with its real outputs (on the reference)."""
    from flashjit.varlen import paged_varlen_fwd

    monkeypatch.setenv("FLASHJIT_BACKEND", "reference")
    for batch, lens_k, max_q in ((_batch, LENS[1], max(LENS[0])), (_decode_batch, DECODE_LENS_K, 1)):
        q, k, v, cu_q, cu_k = batch(4, 2, 32, torch.float32, "cpu")
        k_cache, v_cache, table = _paged(k, v, lens_k, 16)
        torch.library.opcheck(paged_varlen_fwd, (q, k_cache, v_cache, table, cu_q, cu_k, max_q, max(lens_k),
                                                 None, None, None, True, -1, 0, 0.0))


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("features", DECODE_FEATURES + [dict(causal=True, gqa=False)],
                         ids=lambda f: "-".join(map(str, f.values())))
def test_decoding_batch_kernels_match_the_reference_per_sequence(dtype, features):
    """The decoding route on the kernels (GQA-packed rows, and split keys for the 2000-key sequence): out and
    lse of each sequence against the fp32 reference; the sequence with no keys gives 0 and +inf (or the sink)."""
    h, hk = 8, 8 if features.get("gqa") is False else 2
    q, k, v, cu_q, cu_k = _decode_batch(h, hk, 128, dtype, "cuda")
    k_cache, v_cache, table = _paged(k, v, DECODE_LENS_K, 64, device="cuda")
    kwargs = _features({key: val for key, val in features.items() if key != "gqa"}, h, "cuda")
    with torch.no_grad():
        out, lse, _ = flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, 1, max(DECODE_LENS_K), block_table=table,
                                             return_attn_probs=True, **kwargs)
    assert out.shape == q.shape and lse.shape == (h, len(DECODE_LENS_K))
    starts = [0, *itertools.accumulate(DECODE_LENS_K)]
    for b in range(len(DECODE_LENS_K)):
        keys = slice(starts[b], starts[b + 1])
        (ref, ref_lse), (low, low_lse) = reference_and_low(q[b:b + 1, None], k[keys][None], v[keys][None], **kwargs)
        assert_close(f"sequence {b}", out[b:b + 1, None], ref, low)
        assert_lse_close(lse[:, b:b + 1][None], ref_lse, low_lse)
