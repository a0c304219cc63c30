"""Hugging Face transformers 5.x: `attn_implementation="fjit"` runs flashjit's attention.

    from flashjit.integrations.transformers import register
    name = register()                                    # "fjit"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=name, dtype=torch.bfloat16)

transformers looks the name up in two registries, and register() fills both:
- AttentionInterface: the per-layer function, attention_forward(module, query, key, value,
  attention_mask, dropout, scaling, sliding_window, softcap, is_causal, s_aux, **kwargs) with query
  [B, H, Sq, D], key [B, H_k, Sk, D] and value [B, H_k, Sk, D_v] (GQA: passed with their H_k heads,
  no repeat; MLA models such as DeepSeek-V3 have D_v < D, which the kernels take as is), which
  returns (out [B, Sq, H, D_v], None).
- AttentionMaskInterface: build_mask turns the model's 2D padding mask, cache offsets and mask pattern
  into what attention_forward receives, once per forward. A name without one gets no mask at all
  (masking_utils skips names it does not know), so padding would be silently ignored.

The name must not contain "flash": transformers sends every such name through its own flash-attention
code (utils.generic.is_flash_attention_requested is `"flash" in name`; modeling_utils, generation and
masking_utils ask it), which imports flash_attn or a Hub kernel. Names with "sdpa" or "flex_attention"
get those backends' checks, and "org/name" is loaded from the Hub as a kernel.

Masks, in transformers' terms: query i (absolute position) sees key j when j <= i and, with a sliding
window W, j > i - W (masking_utils.sliding_window_overlay): flash's window_size=(W - 1, 0), with
bottom-right causal alignment, which is also what a query chunk against a longer KV cache needs.
Non-causal modules follow transformers' flash convention, (W - 1, W - 1) (ModernBERT passes
config.sliding_window + 1 for it). Padded batches, packed sequences (position_ids restarting) and
chunked attention run through flashjit.flash_attn_varlen_func; without it they raise
NotImplementedError, never silently attend to padding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import flashjit

try:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, causal_mask_function
except ImportError as exc:  # an optional extra: say how to get it
    raise ImportError("flashjit.integrations.transformers needs transformers>=5: "
                      "pip install 'flashjit[transformers]'") from exc

NAME = "fjit"

# Substrings of attn_implementation that transformers interprets itself (modeling_utils, hub_kernels).
_TAKEN = {"flash": "transformers runs every name containing 'flash' through its own flash-attention code",
          "sdpa": "transformers applies SDPA's checks and fallbacks to names containing 'sdpa'",
          "flex_attention": "transformers applies FlexAttention's checks to names containing 'flex_attention'",
          "/": "transformers loads 'org/name' from the Hub as a kernel",
          "|": "transformers reads 'prefix|name' as a paged-attention prefix"}


def register(name: str = NAME) -> str:
    """Register flashjit's attention and mask functions with transformers under `name` and return it,
    for `attn_implementation=name` in from_pretrained / from_config / set_attn_implementation."""
    for part, why in _TAKEN.items():
        if part in name.lower():
            raise ValueError(f"attn_implementation name {name!r} contains {part!r}: {why}; choose another")
    if name in ("eager", ""):
        raise ValueError(f"attn_implementation name {name!r} is taken by transformers; choose another")
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, build_mask)
    return name


# Under torch.compile (generate() compiles the forward for static caches on CUDA), the mask and the
# unpadding plan run eagerly: both read data-dependent sizes (one sync per mask), and tracing them would
# specialise on the cache offset, recompiling at every decoding step.
@torch.compiler.disable
def build_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
               use_vmap=False, device="cpu", **kwargs):
    """The mask attention_forward receives: None when each query sees all keys that causal (or no)
    masking and the sliding window allow, else segment ids [B, L] int32 (0: never attended, e.g.
    padding; k > 0: the row's k-th sequence), run through varlen. Key slot j holds absolute position
    kv_offset + j and query i position q_offset + i; attention_mask [B, >= kv_offset + kv_length] bool.
    Causal masks end at the last query (L = q_offset - kv_offset + q_length): later slots are unfilled
    static-cache entries that no query sees."""
    if use_vmap:  # masking_utils sets it exactly when the model adds its own or/and mask functions
        raise NotImplementedError(
            f"attn_implementation={NAME!r}: this model overlays its own mask pattern (an or/and mask function, "
            "e.g. image tokens attending bidirectionally), which flashjit cannot express; use 'sdpa' or 'eager'")
    bidirectional = "allow_is_bidirectional_skip" in kwargs  # only create_bidirectional*_mask pass it
    length = kv_length if bidirectional else int(q_offset) - kv_offset + q_length  # static caches: q_offset a tensor
    if attention_mask is None and mask_function is causal_mask_function and not bidirectional:
        # masking_utils passes its plain causal function only when nothing (packing, overlays) wraps it:
        # no padding, one sequence a row, known without the checks' device sync (a static cache's
        # q_offset, a device tensor, is still read above). That sync made a training step wait for the
        # host (bench_transformers --host: 2 syncs a step against sdpa's 1).
        return None if length == kv_length else torch.ones(batch_size, length, dtype=torch.int32, device=device)
    valid = torch.ones(batch_size, length, dtype=torch.bool, device=device)
    if attention_mask is not None:
        given = attention_mask[:, kv_offset:kv_offset + length]
        valid = F.pad(given, (0, length - given.shape[1]))  # positions past the 2D mask: unfilled, never seen
    segments = valid.to(torch.int32)
    checks = [valid.all()]
    if not bidirectional and mask_function is not None and length > 1:
        # Read the causal pattern off the model's mask function on two diagonals: no token may see the next
        # one (bidirectional blocks would), and where a token does not see the one before it a new
        # sequence starts (packed sequences from position_ids, chunked attention).
        pos = torch.arange(kv_offset + 1, kv_offset + length, device=device)[None]
        rows, head = torch.arange(batch_size, device=device)[:, None], torch.zeros((), dtype=torch.long, device=device)
        sees_next = mask_function(rows, head, pos - 1, pos).expand(batch_size, length - 1)
        starts = ~mask_function(rows, head, pos, pos - 1).expand(batch_size, length - 1)
        segments = (F.pad(starts.cumsum(-1, dtype=torch.int32), (1, 0)) + 1) * valid
        checks += [sees_next.any(), starts.any()]
    all_valid, *pattern = torch.stack(checks).tolist()  # one device sync per mask, not per layer
    if pattern and pattern[0]:
        raise NotImplementedError(
            f"attn_implementation={NAME!r}: this model's causal mask lets tokens see later ones (e.g. bidirectional "
            "blocks of image tokens), which flashjit cannot express; use 'sdpa' or 'eager'")
    if all_valid and not (pattern and pattern[1]) and length == kv_length:
        return None
    return segments


def _window(sliding_window, causal, seqlen_k):
    """flash's window_size for transformers' sliding_window (see the module docstring)."""
    if not sliding_window or seqlen_k <= sliding_window:  # the window covers every key: no window kernel needed
        return (-1, -1)
    return (sliding_window - 1, 0 if causal else sliding_window - 1)


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                      softcap=None, is_causal=None, s_aux=None, **kwargs):
    """transformers' attention-function protocol on flashjit: query [B, H, Sq, D], key [B, H_k, Sk, D],
    value [B, H_k, Sk, D_v] (D_v <= D), attention_mask from build_mask -> (out [B, Sq, H, D_v], None).
    Causal is bottom-right aligned, so decoding (Sq = 1 or a chunk) against a longer KV cache needs no
    mask. s_aux: gpt-oss's per-head sink logits, flashjit's learnable_sink."""
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # flash layout [B, S, H, D], views
    args = dict(dropout_p=dropout, softmax_scale=scaling, causal=causal, softcap=softcap or 0.0,
                deterministic=torch.are_deterministic_algorithms_enabled())
    if s_aux is not None:
        args["learnable_sink"] = s_aux
    if attention_mask is None:
        out = flashjit.flash_attn_func(q, k, v, window_size=_window(sliding_window, causal, k.shape[1]), **args)
    else:
        out = _masked(q, k, v, attention_mask, sliding_window, args)
    return out, None


def varlen_func():
    """flashjit.flash_attn_varlen_func (flashjit/varlen.py), or None in a flashjit without it."""
    func = getattr(flashjit, "flash_attn_varlen_func", None)
    if func is None:
        try:
            from flashjit.varlen import flash_attn_varlen_func as func
        except ImportError:
            return None
    return func


def _masked(q, k, v, segments, sliding_window, args):
    if not (isinstance(segments, torch.Tensor) and segments.dim() == 2):
        raise ValueError(
            f"attn_implementation={NAME!r} got an attention mask of shape {tuple(getattr(segments, 'shape', ()))}: it "
            "runs the masks its own mask function builds from a 2D padding mask, not custom 4D masks; "
            "use 'sdpa' or 'eager' for those")
    k, v = k[:, :segments.shape[1]], v[:, :segments.shape[1]]  # later slots: unfilled static-cache entries
    if not torch.compiler.is_compiling() and not args["dropout_p"] and args["causal"] and q.shape[-1] % 8 == 0 \
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))):
        leftpad, ends, padded = _left_padding(segments, q.shape[1])
        # Each row one run of valid slots ending at the last: no unpadding needed. Without padding (a
        # static cache's filled part) a prefill keeps flash_attn_func's kernels (on Hopper, the TMA
        # forward; the KV-cache kernels are the sm_80 family) and decoding takes the KV-cache kernel.
        if leftpad is not None and (padded or q.shape[1] <= 64):
            # The KV-cache kernels share one head dim for k and v (as flash-attn's caches): an MLA model's
            # smaller value head dim is zero-padded for them and the output cropped, which keeps decoding
            # on the split-KV kernel instead of a varlen gather of the whole cache each layer and step.
            d_v = v.shape[-1]
            v_cache = v if d_v == q.shape[-1] else F.pad(v, (0, q.shape[-1] - d_v))
            out = flashjit.flash_attn_with_kvcache(q, k, v_cache, cache_seqlens=ends,
                                                   cache_leftpad=leftpad, causal=True,
                                                   softmax_scale=args["softmax_scale"], softcap=args["softcap"],
                                                   window_size=_window(sliding_window, True, k.shape[1]),
                                                   learnable_sink=args.get("learnable_sink"))
            return out if d_v == q.shape[-1] else out[..., :d_v]
    plan = _plan(segments, q.shape[1], args["causal"], bool(sliding_window))
    if plan is None:  # every slot valid, one sequence per row (a static cache without padding)
        return flashjit.flash_attn_func(q, k, v, window_size=_window(sliding_window, args["causal"], k.shape[1]),
                                        **args)
    varlen = varlen_func()
    if varlen is None:
        raise NotImplementedError(
            f"attn_implementation={NAME!r}: padded batches (an attention_mask with zeros), packed sequences and "
            f"chunked attention need flashjit.flash_attn_varlen_func, which flashjit {flashjit.__version__} does "
            "not have; pass unpadded batches (no attention_mask, or all ones) or use attn_implementation='sdpa'")
    q_rows, q_cols, k_rows, k_cols, cu_q, cu_k, max_q, max_k, holes = plan
    if holes and sliding_window:
        raise NotImplementedError(
            f"attn_implementation={NAME!r}: a sliding window over a sequence with holes in its attention_mask (e.g. "
            "1 0 1) counts the masked slots in transformers but not in varlen; use 'sdpa' for such masks")
    out = varlen(q[q_rows, q_cols], k[k_rows, k_cols], v[k_rows, k_cols], cu_q, cu_k, max_q, max_k,
                 window_size=_window(sliding_window, args["causal"], max_k), **args)
    return out.new_zeros(*q.shape[:3], out.shape[-1]).index_put((q_rows, q_cols), out)  # padded queries: 0


def _left_padding(segments, q_len):
    """(each row's count of leading padding slots, int32 [B]; where its slots end, int32 [B]; whether any
    row has padding) when every row is one run of valid slots that ends at the last slot (left padding,
    as generate() pads, and no packed sequences) and the queries are the last q_len slots; else
    (None, None, False). Then the KV-cache kernel (flashjit/kvattn.py) runs the
    padded batch in place, its left padding as cache_leftpad, with no gather and no scatter: causal
    bottom-right on each row's valid keys is exactly transformers' mask there, and a padded query row
    sees no key (out 0). Memoised on the mask, as _plan."""
    memo = segments.__dict__.setdefault("_flashjit_leftpad", {})
    if q_len not in memo:
        leftpad = (segments == 0).sum(1, dtype=torch.int32)
        ok = torch.stack([(segments[:, 1:] >= segments[:, :-1]).all() & (segments <= 1).all()
                          & (segments[:, -1] == 1).all(), leftpad.any()])
        ok, padded = ok.tolist() if q_len <= segments.shape[1] else (False, False)  # one device sync per mask
        memo[q_len] = ((leftpad, torch.full_like(leftpad, segments.shape[1]), bool(padded)) if ok
                       else (None, None, False))
    return memo[q_len]


@torch.compiler.disable
def _plan(segments, q_len, causal, windowed):
    """Unpadding for varlen from segment ids [B, L]: the (row, slot) indices of the queries and keys in
    sequence order, cu_seqlens, max seqlens and whether a sequence has holes; None when every slot is
    valid and each row is one sequence. A window needs each query at its own key slot (varlen aligns a
    sequence's queries with its last keys). Memoised on the mask, which every layer shares."""
    plans = segments.__dict__.setdefault("_flashjit_plans", {})
    if (q_len, causal, windowed) in plans:
        return plans[(q_len, causal, windowed)]
    batch, length = segments.shape
    seg = segments.long()
    if causal or windowed:  # queries are the last q_len slots (all of them in bidirectional self-attention)
        q_seg = seg[:, length - q_len:]
    else:  # every query sees its row's keys, as in SDPA, also in cross-attention (bidirectional masks: 0/1)
        q_seg = seg.amax(1, keepdim=True).clamp(max=1).expand(batch, q_len)
    plan = None
    if not bool((seg == 1).all()):
        k_rows, k_cols = seg.nonzero(as_tuple=True)
        q_rows, q_cols = q_seg.nonzero(as_tuple=True)
        if k_rows.numel() == 0:
            raise ValueError(f"attn_implementation={NAME!r}: the attention mask masks every key of every row")
        # One id per (row, segment), increasing along the flattened order since segment ids never decrease.
        k_ids, q_ids = k_rows * (length + 1) + seg[k_rows, k_cols], q_rows * (length + 1) + q_seg[q_rows, q_cols]
        ids, key_of, k_counts = torch.unique_consecutive(k_ids, return_inverse=True, return_counts=True)
        q_counts = torch.bincount(torch.searchsorted(ids, q_ids), minlength=ids.numel())
        keep = (q_counts > 0)[key_of]  # sequences without queries (earlier chunks in a cache) are skipped
        k_rows, k_cols, k_ids = k_rows[keep], k_cols[keep], k_ids[keep]
        k_counts, q_counts = k_counts[q_counts > 0], q_counts[q_counts > 0]
        holes = (k_cols.diff() != 1) & (k_ids.diff() == 0)  # two neighbours of one sequence not adjacent
        max_q, max_k, holes = torch.stack([q_counts.max(), k_counts.max(), holes.any().long()]).tolist()
        cu_q, cu_k = (F.pad(c.cumsum(0), (1, 0)).to(torch.int32) for c in (q_counts, k_counts))
        plan = (q_rows, q_cols, k_rows, k_cols, cu_q, cu_k, max_q, max_k, bool(holes))
    plans[(q_len, causal, windowed)] = plan
    return plan
