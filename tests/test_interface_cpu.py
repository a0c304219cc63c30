"""What needs no GPU: input validation names the argument; the reference matches a naive loop;
import stays light."""
import math
import subprocess
import sys

import pytest
import torch

from flashjit import interface
from flashjit.interface import check_qkv
from flashjit.reference import attention_reference


def _qkv(b=1, sq=8, sk=8, h=2, hk=2, d=64, dtype=torch.float16, device="cpu"):
    return (torch.randn(b, sq, h, d, dtype=dtype, device=device), torch.randn(b, sk, hk, d, dtype=dtype, device=device),
            torch.randn(b, sk, hk, d, dtype=dtype, device=device))


@pytest.mark.parametrize("mutate, exc, words", [
    (lambda q, k, v: (q[0], k, v), ValueError, "q must have 4 dims"),
    (lambda q, k, v: (q.float(), k, v), ValueError, "q must be float16 or bfloat16"),
    (lambda q, k, v: (q, k.bfloat16(), v), ValueError, "share a dtype"),
    (lambda q, k, v: (q, k, v[:, :4]), ValueError, "k and v must have the same shape"),
    (lambda q, k, v: (q, k[..., :32], v[..., :32]), ValueError, "does not match q shape"),
    (lambda q, k, v: (q.transpose(-1, -2), k, v), ValueError, "q must have a contiguous last dimension"),
    (lambda q, k, v: tuple(torch.cat([t, t, t, t, t], -1)[..., :264].contiguous() for t in (q, k, v)),
     ValueError, "head_dim 264 is not supported"),
    (lambda q, k, v: (torch.cat([q, q[:, :, :1]], 2), k, v), ValueError, "divisible by the number of key/value heads"),
    (lambda q, k, v: ("q", k, v), TypeError, "q must be a torch.Tensor"),
    (lambda q, k, v: (q, k, v), ValueError, "FLASHJIT_BACKEND=reference"),  # CPU tensors
])
def test_bad_inputs_name_the_argument(mutate, exc, words):
    q, k, v = mutate(*_qkv())
    with pytest.raises(exc, match=words.replace("(", r"\(")):
        check_qkv(q, k, v)


def _naive(q, k, v, causal, scale):
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    out = torch.zeros(b, sq, h, d, dtype=torch.float64)
    lse = torch.zeros(b, h, sq, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            kh = hi // (h // hk)
            for i in range(sq):
                s = [float(q[bi, i, hi].double() @ k[bi, j, kh].double()) * scale for j in range(sk)
                     if not causal or j <= i + sk - sq]
                if not s:
                    lse[bi, hi, i] = math.inf
                    continue
                m = max(s)
                w = [math.exp(x - m) for x in s]
                lse[bi, hi, i] = m + math.log(sum(w))
                for j, wj in enumerate(w):
                    out[bi, i, hi] += wj / sum(w) * v[bi, j, kh].double()
    return out, lse


@pytest.mark.parametrize("sq, sk, causal", [(5, 5, False), (3, 7, True), (7, 3, True), (1, 4, False)])
def test_reference_matches_naive_loop(sq, sk, causal):
    q, k, v = _qkv(b=2, sq=sq, sk=sk, h=4, hk=2, d=32, dtype=torch.float32)
    out, lse = attention_reference(q, k, v, causal=causal, softmax_scale=0.2, compute_dtype=torch.float64)
    n_out, n_lse = _naive(q, k, v, causal, 0.2)
    assert torch.allclose(out, n_out, atol=1e-10)
    assert torch.equal(torch.isinf(lse), torch.isinf(n_lse.float()))
    assert torch.allclose(lse[torch.isfinite(lse)].double(), n_lse[torch.isfinite(n_lse)], atol=1e-5)


def _naive_features(q, k, v, scale, causal, window, softcap, slopes, sink):
    """flash-attn 2.x's definition, one element at a time in float64 (its tests' attention_ref and
    construct_local_mask): scores scale * q.k, then softcap * tanh(score / softcap), then ALiBi's
    -slope * |i + Sk - Sq - j|; key j is visible to query i iff j <= i + Sk - Sq + right (causal: right
    = 0) and, with left >= 0, j >= i + Sk - Sq - left; a sink logit joins the denominator only. lse is
    the true log-sum-exp of those scores: flash-attn's causal kernel adds slope * j instead of the
    distance term (the same probabilities; its lse is larger by slope * (i + Sk - Sq)), flashjit keeps
    the distance term in every mode so that lse from causal and non-causal calls can be merged."""
    b, sq, h, _ = q.shape
    sk, hk = k.shape[1], k.shape[2]
    left, right = window[0], 0 if causal else window[1]
    out = torch.zeros(b, sq, h, v.shape[-1], dtype=torch.float64)
    lse = torch.full((b, h, sq), math.inf, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            kh = hi // (h // hk)
            for i in range(sq):
                diag = i + sk - sq
                keys = [j for j in range(sk) if (right < 0 or j <= diag + right) and (left < 0 or j >= diag - left)]
                logits = []
                for j in keys:
                    s = float(q[bi, i, hi].double() @ k[bi, j, kh].double()) * scale
                    if softcap > 0:
                        s = softcap * math.tanh(s / softcap)
                    if slopes is not None:
                        s -= float(slopes[hi]) * abs(diag - j)
                    logits.append(s)
                extra = [float(sink[hi])] if sink is not None else []
                if not logits and not extra:
                    continue  # a row that sees nothing: out 0, lse +inf
                m = max(logits + extra)
                total = sum(math.exp(x - m) for x in logits + extra)
                lse[bi, hi, i] = m + math.log(total)
                for j, x in zip(keys, logits):
                    out[bi, i, hi] += math.exp(x - m) / total * v[bi, j, kh].double()
    return out, lse


@pytest.mark.parametrize("trial", range(24))
def test_reference_features_match_flash_attn_definition(trial):
    """attention_reference is the oracle of every GPU test; here it meets an independent element-wise
    definition over random combinations of lengths (Sq > Sk included, so rows see nothing), causal,
    windows, softcap, ALiBi, sinks, GQA and a value head dim below q's."""
    gen = torch.Generator().manual_seed(1000 + trial)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    sq, sk = pick([1, 3, 5, 8]), pick([1, 2, 5, 9])
    h, hk = pick([(2, 2), (4, 2), (4, 1)])
    d, d_v = pick([(8, 8), (16, 8)])
    causal = pick([False, True])
    window = pick([(-1, -1), (2, -1), (-1, 1), (1, 2), (0, 0)])
    softcap = pick([0.0, 0.7])
    slopes = pick([None, torch.rand(h, generator=gen, dtype=torch.float64)])
    sink = pick([None, torch.randn(h, generator=gen, dtype=torch.float64)])
    q = torch.randn(2, sq, h, d, generator=gen, dtype=torch.float64)
    k = torch.randn(2, sk, hk, d, generator=gen, dtype=torch.float64)
    v = torch.randn(2, sk, hk, d_v, generator=gen, dtype=torch.float64)
    scale = 0.3
    out, lse = attention_reference(q, k, v, causal=causal, softmax_scale=scale, compute_dtype=torch.float64,
                                   window_size=window, softcap=softcap, alibi_slopes=slopes, learnable_sink=sink)
    n_out, n_lse = _naive_features(q, k, v, scale, causal, window, softcap, slopes, sink)
    assert torch.allclose(out, n_out, atol=1e-10), (sq, sk, causal, window, softcap, slopes, sink)
    assert torch.equal(torch.isinf(lse), torch.isinf(n_lse))
    assert torch.allclose(lse[torch.isfinite(lse)].double(), n_lse[torch.isfinite(n_lse)], atol=1e-5)


def test_windows_past_any_sequence_are_unbounded_and_never_wrap():
    """A window edge >= 2**29 (MAX_SEQLEN) is -1: exact, and no 32-bit sum in the kernels can wrap
    (2**32 once reached them as 0: the diagonal only). Any negative edge is -1, as flash-attn's."""
    q = torch.zeros(1, 4, 2, 64, dtype=torch.float16)
    for window, causal, expected, local in [((2**32, 0), False, (-1, 0), True), ((2**40 + 5, 3), False, (-1, 3), True),
                                            ((-1, 2**31 - 1), False, (-1, -1), False), ((2**31 - 1, -1), True, (-1, 0), False),
                                            ((2**29 - 1, 7), False, (2**29 - 1, 7), True),
                                            ((-2, 3), False, (-1, 3), True), ((-7, -2**40), False, (-1, -1), False)]:
        mods = interface.score_mods(q, causal, window)
        assert mods.values[:2] == expected and mods.local == local, window
    for bad in [(float("inf"), 0), (1.5, 0), ("2", 0), None, (1,)]:
        with pytest.raises(ValueError, match="window_size"):
            interface.score_mods(q, False, bad)


def test_sequence_lengths_are_capped_where_32_bit_indices_stay_exact():
    q = torch.zeros(1, 1, 1, 64, dtype=torch.float16).expand(1, 2**29 + 1, 1, 64)  # no memory
    k = torch.zeros(1, 1, 1, 64, dtype=torch.float16).expand(1, 8, 1, 64)
    with pytest.raises(ValueError, match=r"at most 2\*\*29.*seqlen_q 536870913"):
        check_qkv(q, k, k)
    with pytest.raises(ValueError, match="seqlen_k 536870913"):
        check_qkv(k[:, :1], q, q)


def test_outputs_that_share_elements_are_refused():
    like = torch.zeros(2, 4, 2, 64, dtype=torch.float16)
    expanded = torch.zeros(1, 4, 2, 64, dtype=torch.float16).expand(2, 4, 2, 64)
    with pytest.raises(ValueError, match="out has elements that share memory"):
        interface._check_output(expanded, like, "out")
    assert interface._check_output(like.clone(), like, "out") is not None
    interface._check_output(expanded, like, "out", kernel_writes=False)  # written by a copy: fine


def test_outputs_in_the_memory_of_what_the_kernels_read_are_refused():
    """out in k's memory would be read by other CTAs while written; dk in k's feeds dK to the
    deterministic dQ kernel. Disjoint views of one buffer pass."""
    buf = torch.zeros(2, 8, 4, 64, dtype=torch.float16)
    q, k, v = buf[0:1], buf[1:2], torch.zeros(1, 8, 4, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="out shares memory with k"):
        interface._out_for(buf[1:2], q, k, v)
    with pytest.raises(ValueError, match="dk shares memory with k"):
        interface._grad_out(k, k, "dk", reads=(("q", q), ("k", k), ("v", v)))
    fresh = torch.zeros(1, 8, 4, 64, dtype=torch.float16)
    assert interface._out_for(fresh, q, k, v) is fresh
    assert interface._grad_out(buf[0:1], k, "dk", reads=(("k", k), ("v", v))) is not None  # disjoint from k and v


@pytest.mark.parametrize("philox", [(1.5, 2), (1,), (-1, 0), (0, 2**64), "ab", None, (True, 0)])
def test_philox_must_be_a_pair_of_uint64(philox):
    with pytest.raises(ValueError, match="philox must be a pair of ints"):
        interface.checked_philox(philox)


def test_philox_accepts_what_philox_state_returns():
    assert interface.checked_philox((2**64 - 1, 0)) == (2**64 - 1, 0)


def test_forward_backward_and_varlen_check_philox_first():
    """The check runs before anything else (a planned call included), on the CPU too."""
    from flashjit import varlen

    q = torch.zeros(1, 4, 2, 64, dtype=torch.float16)
    lse = torch.zeros(1, 2, 4)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    calls = [lambda p: interface.forward(q, q, q, dropout_p=0.1, philox=p),
             lambda p: interface.backward(q, q, q, q, q, lse, dropout_p=0.1, philox=p),
             lambda p: varlen.varlen_forward(q[0], q[0], q[0], cu, cu, 4, 4, dropout_p=0.1, philox=p),
             lambda p: varlen.varlen_backward(q[0], q[0], q[0], q[0], q[0], lse[0], cu, cu, 4, 4, dropout_p=0.1,
                                              philox=p)]
    for call in calls:
        with pytest.raises(ValueError, match="philox must be a pair of ints"):
            call((2**64 + 5, 0))


def test_softmax_scale_takes_any_real_number_as_flash_attn():
    np = pytest.importorskip("numpy")
    q = torch.zeros(1, 2, 1, 64, dtype=torch.float16)
    for scale in (np.float32(0.25), torch.tensor(0.25), torch.tensor([0.25]), 0.25, 1):
        assert interface.softmax_scale_or_default(q, scale) == float(scale)
    for bad in (torch.tensor([0.1, 0.2]), "0.1", -0.1, float("nan"), torch.tensor(1j)):
        with pytest.raises(ValueError, match="softmax_scale"):
            interface.softmax_scale_or_default(q, bad)


def test_sparse_inputs_are_named():
    q = torch.zeros(1, 4, 2, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="q must be a dense"):
        check_qkv(q.to_sparse(), q, q)


def test_kv_cache_page_and_capacity_limits(monkeypatch):
    from flashjit import kvattn
    q = torch.zeros(2, 1, 2, 64, dtype=torch.float16)
    empty = torch.zeros(0, 16, 2, 64, dtype=torch.float16)
    lens = torch.zeros(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="k_cache must have from 1 to 2\\*\\*31 - 1 pages"):
        kvattn._check(q, empty, empty, lens, None, torch.zeros(2, 1, dtype=torch.int32), None)
    monkeypatch.setattr(interface, "check_qkv", lambda *a, **k: None)  # past the CUDA check, to the arithmetic
    cache = torch.zeros(1, 16, 2, 64, dtype=torch.float16)
    table = torch.zeros(1, 1, dtype=torch.int32).expand(2, 2**25 + 1)  # (2**25 + 1) * 16 slots > 2**29
    with pytest.raises(ValueError, match="exceed the longest cache"):
        kvattn._check(q, cache, cache, lens, None, table, None)


def test_import_is_light():
    code = "import sys, time; t = time.perf_counter(); import flashjit; print(time.perf_counter() - t, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert float(out[0]) < 0.5 and out[1] == "False"


def test_envvars_are_declared_and_documented():
    from flashjit import envvars
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for var in envvars.ALL:
        assert var.name.startswith("FLASHJIT_") and var.doc
        assert var.name in readme, f"{var.name} missing from README"


@pytest.mark.parametrize("bad, words", [("dout", "dout must match q"), ("out", "out must match q"),
                                        ("lse_shape", "lse must be"), ("lse_dtype", "lse must be")])
def test_backward_checks_its_arguments(bad, words, monkeypatch):
    import flashjit.interface as iface

    monkeypatch.setattr(iface, "check_qkv", lambda *args: None)  # q/k/v are fine; only the CPU device is not
    q, k, v = _qkv()
    out, dout, lse = torch.randn_like(q), torch.randn_like(q), torch.randn(1, 2, 8)
    if bad == "dout":
        dout = dout[:, :4]
    elif bad == "out":
        out = out.float()
    elif bad == "lse_shape":
        lse = lse[:, :, :4]
    else:
        lse = lse.double()
    with pytest.raises(ValueError, match=words):
        iface.backward(dout, q, k, v, out, lse)


def test_configs_of_the_other_direction_are_refused(monkeypatch):
    """forward takes a forward family's config, backward a backward family's: the other would run a
    kernel on a params struct it does not read (TypeError naming the accepted classes)."""
    import flashjit.interface as iface
    from flashjit import BwdConfig, BwdSm90Config, KernelConfig

    q, k, v = _qkv()
    with pytest.raises(TypeError, match="config must be a flashjit.KernelConfig or flashjit.FwdSm90Config, got BwdConfig"):
        iface.resolve_config(q, k, BwdConfig(d_head=64), False)
    monkeypatch.setattr(iface, "check_qkv", lambda *args: None)  # q/k/v are fine; only the CPU device is not
    monkeypatch.setattr(iface.jit, "arch_for", lambda device_index: "sm_90a")
    monkeypatch.setattr(iface, "_smem_limit", lambda device_index: (227 * 1024, "H100"))
    out, dout, lse = torch.randn_like(q), torch.randn_like(q), torch.randn(1, 2, 8)
    with pytest.raises(TypeError, match="config must be a flashjit.BwdConfig or flashjit.BwdSm90Config, got Kernel"):
        iface.backward(dout, q, k, v, out, lse, config=KernelConfig(dtype="fp16", d_head=64))
    with pytest.raises(ValueError, match="does not match the inputs: dtype='bf16'"):  # a backward config passes
        iface.backward(dout, q, k, v, out, lse, config=BwdSm90Config(d_head=64, block_m=128))


def test_hopper_backward_copies_with_cp_async_where_tma_cannot_address(monkeypatch):
    """The dispatcher's Hopper backward loads with TMA, whose maps cannot address a zero stride (k/v
    broadcast by expand, a dout broadcast over the rows): then it takes the same kernel fed by cp.async
    (tma=False); a caller's TMA-fed config is a ValueError naming the fix."""
    import dataclasses

    import flashjit.interface as iface

    monkeypatch.setattr(iface.jit, "arch_for", lambda device_index: "sm_90a")
    monkeypatch.setattr(iface, "_smem_limit", lambda device_index: (227 * 1024, "H100"))
    monkeypatch.setattr(iface.tuning, "lookup", lambda *args, **kwargs: None)
    q = torch.randn(2, 64, 4, 128, dtype=torch.bfloat16)
    k = torch.randn(1, 64, 2, 128, dtype=torch.bfloat16).expand(2, -1, -1, -1)
    dout = torch.randn(2, 1, 4, 128, dtype=torch.bfloat16).expand(-1, 64, -1, -1)
    mods = iface.score_mods(q, False)

    def pick(*tensors, config=None):
        return iface.bwd_config(config, q.dtype, 128, False, 64, mods, False, 0, tensors=tensors)

    assert pick(q, q, q, q).tma
    for tensors in ((q, k, k, q), (q, q, q, dout)):
        chosen = pick(*tensors)
        assert chosen == dataclasses.replace(pick(q, q, q, q), tma=False)
        with pytest.raises(ValueError, match="loads with TMA, which cannot address .*tma=False"):
            pick(*tensors, config=dataclasses.replace(chosen, tma=True))
        assert pick(*tensors, config=chosen) == chosen  # the cp.async feed takes any strides


@pytest.mark.parametrize("rounds, zero_out, ones_out", [
    (7, [0x5F6FB709, 0x0D893F64, 0x4F121F81, 0x4F730A48], [0x5207DDC2, 0x45165E59, 0x4D8EE751, 0x8C52F662]),
    (10, [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8], [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
])
def test_philox_matches_random123_known_answers(rounds, zero_out, ones_out):
    """reference.philox4x32 (and so the kernels' mask, which the GPU tests check against it)
    against Random123's published Philox4x32 test vectors (kat_vectors), at the kernels' 7 rounds
    and at 10."""
    from flashjit.codegen import kernels_dir
    from flashjit.reference import PHILOX_ROUNDS, philox4x32

    source = (kernels_dir() / "common" / "dropout.cuh").read_text()
    assert f"constexpr int kPhiloxRounds = {PHILOX_ROUNDS};" in source  # the reference is the kernels' RNG
    zero = philox4x32((0, 0), [torch.tensor(0)] * 4, rounds)
    assert [int(w) for w in zero] == zero_out
    ones = philox4x32((0xFFFFFFFF, 0xFFFFFFFF), [torch.tensor(0xFFFFFFFF)] * 4, rounds)
    assert [int(w) for w in ones] == ones_out


@pytest.mark.parametrize("p, threshold", [(0.0, 0), (0.1, 26), (0.5, 128), (0.001, 1), (0.999, 255)])
def test_dropout_threshold_and_mask_fraction(p, threshold):
    from flashjit.interface import dropout_threshold
    from flashjit.reference import philox_keep_mask

    assert dropout_threshold(p) == threshold
    if threshold:
        keep = philox_keep_mask(2**40 + 7, 12, threshold, 2, 2, 64, 300, "cpu")
        assert abs(keep.float().mean().item() - (1 - threshold / 256)) < 0.01
    with pytest.raises(ValueError, match="dropout_p"):
        dropout_threshold(1.0)


def test_backward_splits_heads_only_gqa_grids_below_the_waves():
    """One dK/dV CTA per query head only for GQA, and only while the key/value-head grid is short of
    the dispatcher's waves of SMs (132 here: an H100/H200): 4 causal (16 for the wide kernel), under one
    without a mask."""
    from flashjit.dispatch import HEAD_SPLIT_WAVES, HEAD_SPLIT_WAVES_CAUSAL, backward_splits_heads

    sms = 132
    for causal in (False, True):
        assert not backward_splits_heads(1, 16, 16, 1024, 128, sms, causal), "no GQA: nothing to split"
        assert backward_splits_heads(1, 32, 8, 1024, 128, sms, causal)  # 64 CTAs: half the SMs idle
        assert not backward_splits_heads(64, 32, 8, 4096, 128, sms, causal)
        edge = int((HEAD_SPLIT_WAVES_CAUSAL if causal else HEAD_SPLIT_WAVES) * sms)  # enough CTAs from here
        assert backward_splits_heads(1, 32, 8, (edge // 8 - 1) * 128, 128, sms, causal)
        assert not backward_splits_heads(1, 32, 8, (edge // 8 + 1) * 128, 128, sms, causal)
    assert backward_splits_heads(1, 16, 4, 4096, 128, sms, True)  # the transformers shape: 128 CTAs
    assert not backward_splits_heads(1, 16, 4, 4096, 128, sms, False)
    # The wide kernel (64-key CTAs) splits causal grids up to more waves: B=1 S=8k 32/8 (1024 kv-head
    # CTAs) splits there and not in the narrow kernel's 128-key grid of the same shape (512)...
    assert backward_splits_heads(1, 32, 8, 8192, 64, sms, True, wide=True)
    assert not backward_splits_heads(2, 32, 8, 8192, 128, sms, True)
    # ...but not B=4 (4096), nor without a mask.
    assert not backward_splits_heads(4, 32, 8, 8192, 64, sms, True, wide=True)
    assert not backward_splits_heads(1, 32, 8, 8192, 64, sms, False, wide=True)


# A causal tile's fixed cost in key blocks, measured (H100, the forty-seventh session: the value that reproduces
# the walk A/Bs at 1k-4k, docs/perf-log.md); the walk tests score lists with it, not with dispatch's own model.
MEASURED_TILE_COST = 1.5


def _walk_loads(walk, num_m, work):
    """(each CTA's load, the tiles in walk order) of a dispatch.causal_walk tuple."""
    grid, offsets, tiles = walk[0], walk[1:walk[0] + 2], walk[walk[0] + 2:]
    return [sum(work(t % num_m) for t in tiles[offsets[c]:offsets[c + 1]]) for c in range(grid)], list(tiles)


@pytest.mark.parametrize("rows, seqlen, block_m, block_n, static", [
    (16, 16384, 128, 128, 0.653), (64, 8192, 192, 128, 0.837), (16, 8192, 128, 80, 0.658), (8, 16384, 128, 80, 0.560),
    (64, 4096, 128, 128, 0.970), (512, 1024, 192, 128, 0.947), (256, 1024, 128, 128, 0.970)], ids=str)
def test_causal_walk_balances_where_the_static_walk_did_not(rows, seqlen, block_m, block_n, static):
    """dispatch.causal_walk covers every tile of the grid once, in per-CTA lists laid out as the kernel reads
    them, and balances the grids (16k tokens, 132 SMs) that the kernel's static walk (odd rounds reversed,
    simulated here: `static` of ideal) left idle, and d128's 1k rows, to within 3% of ideal. Scored with a
    tile's measured time, its key blocks plus MEASURED_TILE_COST: at 1k rows of 128 (tiles of 1-8 blocks) lists
    made with a cost of 1 score 0.908 and fail."""
    from flashjit.dispatch import causal_walk

    walk = causal_walk(rows, seqlen, seqlen, block_m, block_n, 132)
    num_m = -(-seqlen // block_m)
    work = lambda block: (min((num_m - block) * block_m, seqlen) - 1) // block_n + 1 + MEASURED_TILE_COST  # noqa: E731
    loads, tiles = _walk_loads(walk, num_m, work)
    assert walk[0] == 132 and sorted(tiles) == list(range(rows * num_m))
    ideal = sum(loads) / 132
    assert ideal / max(loads) >= 0.97
    rounds = [0] * 132  # the static walk: tile i of round r to CTA i mod 132, reversed on odd rounds
    for i, block in enumerate(b for _ in range(rows) for b in range(num_m)):
        r, c = divmod(i, 132)
        rounds[131 - c if r & 1 else c] += work(block)
    assert abs(ideal / max(rounds) - static) < 0.005


def test_causal_walk_bottom_right_rows_small_grids_and_its_limit():
    """Bottom-right causal rows: with Sq > Sk the first rows see no key (a tile of no key blocks still counts
    its fixed cost), with Sq < Sk every tile sees Sk - Sq more keys; fewer tiles than CTAs give a grid
    of one tile a CTA (the launcher's grid: min(tiles, CTAs)); past WALK_MAX_ROUNDS rounds, no list (the
    kernel's static walk: many rounds of mixed lengths average out), nor for no tile at all."""
    from flashjit.dispatch import WALK_MAX_ROUNDS, causal_walk

    # Sq 1000 over Sk 300: blocks (0 = rows 896-999) see 3 / 2 / 1 / 0... key blocks (+1.5 each): 4.5 3.5 2.5 1.5
    # 1.5 1.5 1.5 1.5, handed to whichever of two CTAs frees first (the lower on a tie); Sq 300 over Sk 1000: 9.5 9.5
    # 8.5.
    for seqlen_q, seqlen_k, lists in ((1000, 300, ([0, 3, 4, 6], [1, 2, 5, 7])), (300, 1000, ([0, 2], [1]))):
        assert causal_walk(1, seqlen_q, seqlen_k, 128, 128, 2) == (2, 0, len(lists[0]), sum(map(len, lists)),
                                                                   *lists[0], *lists[1])
        walk = causal_walk(1, seqlen_q, seqlen_k, 128, 128, 132)  # fewer tiles than CTAs: one each, in order
        tiles = sum(map(len, lists))
        assert walk == (tiles, *range(tiles + 1), *range(tiles))
    assert causal_walk(WALK_MAX_ROUNDS * 132 // 32, 4096, 4096, 128, 128, 132) is not None
    assert causal_walk(WALK_MAX_ROUNDS * 132 // 32 + 1, 4096, 4096, 128, 128, 132) is None
    assert causal_walk(1, 0, 300, 128, 128, 132) is None  # no query (a varlen batch's empty sequence as a dense call)


def test_walk_tensor_is_made_off_the_callers_thread_and_the_first_stored_wins(monkeypatch):
    """interface._walk makes a grid's device walk on a thread of its own (torch.compile's CUDA graph trees route
    the calling thread's allocations into a graph's pool while warming it up: a walk kept from there failed
    their pool check) and keeps the first walk stored for a grid (one replaced under a plan holding its pointer
    would be freed). CPU tensors stand in for the device's."""
    import threading

    from flashjit import FwdSm90Config

    monkeypatch.setattr(interface, "_walks", {})
    monkeypatch.setattr(interface, "sm_count", lambda device_index: 132)
    monkeypatch.setattr(interface.torch.cuda, "is_current_stream_capturing", lambda: False)
    config = FwdSm90Config.parse_name("fwd_sm90_bf16_d64_m128_n64_st4_ov0_pp0_ps1_causal1_x2")
    q, k = torch.empty(2, 1000, 4, 64), torch.empty(2, 1000, 2, 64)
    make_on_own_thread, makers = interface._on_own_thread, []

    def recording(make):
        return make_on_own_thread(lambda: (makers.append(threading.get_ident()), make())[1])

    monkeypatch.setattr(interface, "_on_own_thread", recording)
    walk = interface._walk(config, q, k, 0)
    assert walk is not None and walk[0].dtype == torch.int32 and walk[1] == walk[0][0].item()
    assert makers and makers[0] != threading.get_ident(), "the walk was made on the caller's thread"
    assert interface._walk(config, q, k, 0) is walk and len(makers) == 1, "a grid's walk is made once"

    # Another thread stores its walk for the grid while this one makes its own: both launch the first stored.
    (key,) = interface._walks
    interface._walks.clear()
    theirs = (torch.zeros(1, dtype=torch.int32), 0)

    def racing(make):
        mine = make_on_own_thread(make)
        interface._walks[key] = theirs
        return mine

    monkeypatch.setattr(interface, "_on_own_thread", racing)
    assert interface._walk(config, q, k, 0) is theirs and interface._walks[key] is theirs
    with pytest.raises(ZeroDivisionError):  # an error on the maker's thread is raised on the caller's
        make_on_own_thread(lambda: 1 / 0)


def test_with_tile_walk_runs_one_cta_a_tile_for_varlen_batches_and_long_causal_rows():
    """One CTA a tile for a varlen batch and for causal rows of more than WALK_MAX_BLOCKS query blocks in a
    grid of at most WALK_MAX_ROUNDS rounds (measured faster than the walk's lists there); every other dense
    grid keeps the persistent kernel (causal ones walk dispatch.causal_walk's lists), two CTAs an SM too."""
    import dataclasses

    from flashjit import FwdSm90Config, KernelConfig
    from flashjit.dispatch import WALK_MAX_BLOCKS, WALK_MAX_ROUNDS, default_config, get_kernels_to_build, with_tile_walk

    sms = lambda: 132  # noqa: E731
    causal = default_config("bf16", 64, True, 8192, arch="sm_90a")
    assert isinstance(causal, FwdSm90Config) and causal.persistent, "d64's default walks persistently"
    twin = causal.one_cta_per_tile()
    assert with_tile_walk(causal, (2, 32), 8192, sms) is causal  # 43 blocks of 192 rows
    assert with_tile_walk(causal, (1, 32), 192 * WALK_MAX_BLOCKS + 1, sms) == twin
    long_rows = WALK_MAX_ROUNDS * 132 // (WALK_MAX_BLOCKS + 1) + 1  # past the rounds: the static walk balances
    assert with_tile_walk(causal, (long_rows, 1), 192 * (WALK_MAX_BLOCKS + 1), sms) is causal
    assert with_tile_walk(dataclasses.replace(causal, local=True), (1, 32), 16384, sms).persistent
    plain = default_config("bf16", 64, False, 16384, arch="sm_90a")
    assert with_tile_walk(plain, (1, 32), 16384, sms) is plain
    two = default_config("bf16", 64, True, 1024, arch="sm_90a")  # two CTAs an SM
    assert two.two_ctas and two.persistent, "d64's causal 1k default runs two CTAs an SM, persistent"
    for kept in (two, dataclasses.replace(two, local=True), default_config("bf16", 64, True, 1024, dropout=True,
                                                                            arch="sm_90a")):
        assert kept.two_ctas and all(with_tile_walk(kept, (b, 32), s, sms) is kept
                                     for b, s in ((32, 512), (21, 768), (16, 1024), (1, 1024))), kept.name
    assert two.one_cta_per_tile() in get_kernels_to_build(arch="sm_90a")
    for config in (causal, plain):  # a varlen batch: lengths unknown to the host, mixed
        assert with_tile_walk(config, None, 4096, sms) == dataclasses.replace(config, persistent=False, cross_tile=False)
        assert with_tile_walk(config, None, 4096, sms) in get_kernels_to_build(arch="sm_90a"), \
            "the twin with_tile_walk picks is in the build set"
    sm80 = KernelConfig("bf16", 64, causal=True)
    assert with_tile_walk(sm80, (1, 32), 16384, sms) is sm80 and with_tile_walk(sm80, None, 16384, sms) is sm80


def test_with_head_split_sets_the_field_only_for_short_gqa_grids_on_the_wgmma_kernel():
    """dispatch.with_head_split turns the wgmma backward config of a short GQA grid into its head-split
    twin and leaves every other config (sm_80 family, long grids, no GQA) as it is."""
    import dataclasses

    from flashjit import BwdConfig, BwdSm90Config
    from flashjit.dispatch import with_head_split

    wgmma = BwdSm90Config("bf16", 128, 64, causal=True)
    assert with_head_split(wgmma, 1, 16, 4, 4096, 132) == dataclasses.replace(wgmma, head_split=True)
    assert with_head_split(wgmma, 1, 16, 16, 4096, 132) is wgmma
    assert with_head_split(wgmma, 64, 16, 4, 4096, 132) is wgmma
    sm80 = BwdConfig("bf16", 128, causal=True)
    assert with_head_split(sm80, 1, 16, 4, 4096, 132) is sm80


def test_the_dispatchers_default_gives_way_to_its_plain_twin_where_ptxas_serialized_it(monkeypatch):
    """chosen_config passes its default (not a tuned entry, nor the sm_80 kernel it takes where TMA cannot
    address an input) through jit.unserialized: with the causal d128 default's build noted and its twin's
    not, the twin (no half blocks) runs; a tuned entry is left as it is."""
    import dataclasses

    from flashjit import FwdSm90Config, jit

    monkeypatch.setattr(interface.jit, "arch_for", lambda device_index: "sm_90a")
    monkeypatch.setattr(interface, "_smem_limit", lambda device_index: (227 * 1024, "H100"))
    monkeypatch.setattr(interface, "sm_count", lambda device_index: 132)
    monkeypatch.setattr(interface.tuning, "lookup", lambda *args, **kwargs: None)
    asked = []
    monkeypatch.setattr(jit, "notes_of", lambda cfg, arch: asked.append(cfg) or (["C7511"] if cfg.half_blocks else []))
    jit.unserialized.cache_clear()
    try:
        q, k, v = (t.bfloat16() for t in _qkv(2, 4096, 4096, 16, 16, 128))
        out = torch.empty_like(q)

        def chosen(*tensors):
            return interface.chosen_config("bf16", 128, 128, True, 4096, interface._NO_MODS, 0, tensors, grid=(2, 16))

        default = chosen(q, k, v, out)
        assert isinstance(default, FwdSm90Config) and not default.half_blocks and asked[-1] == default
        assert asked[0].half_blocks and asked[0].plain() == default  # the dispatcher's choice, then its twin
        broadcast = k[:1].expand(2, -1, -1, -1)  # a zero batch stride: TMA cannot address it
        asked.clear()
        assert not isinstance(chosen(q, broadcast, v, out), FwdSm90Config) and asked == []
        tuned = dataclasses.replace(default, half_blocks=True)  # (as if timed: it stays, noted or not)
        monkeypatch.setattr(interface.tuning, "lookup", lambda *args, **kwargs: tuned)
        assert chosen(q, k, v, out) == tuned and asked == []
    finally:
        jit.unserialized.cache_clear()
