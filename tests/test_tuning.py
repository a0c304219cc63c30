"""Persisted autotuning (flashjit/tuning.py) without a GPU: a fake table for a fake GPU identity in a
private cache, read by the dispatcher (forward and backward), keyed to the GPU, the nearest tuned
sequence length, the call's features on the tuned tiles, FLASHJIT_TUNED=0, damaged tables, and the
candidate lists. `python -m flashjit tune` itself needs a GPU (tests/test_cli.py checks it says so
without one); its measured gains are in docs/perf-log.md."""
import dataclasses
import json
import logging

import pytest
import torch

from flashjit import BwdConfig, FwdSm90Config, KernelConfig, interface, tuner, tuning

H200 = dict(name="NVIDIA H200", sm_count=132, driver=13000, flashjit="0.1.0")
TUNED_FWD = FwdSm90Config("bf16", 128, block_n=96, stages=3, pingpong=False)
TUNED_BWD = BwdConfig("bf16", 128, 8, 64, 1, 16)  # not the default (8 x 64 split in pairs)


@pytest.fixture
def table(private_cache, monkeypatch):
    """A table for the fake H200 in a private cache; the dispatcher believes it runs on it."""
    monkeypatch.setattr(tuning, "device_identity", lambda device_index: H200)
    monkeypatch.setattr(interface.jit, "arch_for", lambda device_index: "sm_90a")
    monkeypatch.setattr(interface, "_smem_limit", lambda device_index: (227 * 1024, "NVIDIA H200"))
    monkeypatch.setattr(interface, "sm_count", lambda device_index: H200["sm_count"])  # a persistent default's walk
    tuning._entries_for.cache_clear()
    path = tuning.write_table(H200, {
        tuning.problem_key("fwd", "bf16", 128, False, 4096): dict(config=TUNED_FWD.name, ms=1.0, default="x", default_ms=1.1),
        tuning.problem_key("fwd", "bf16", 128, False, 512): dict(config=TUNED_FWD.name.replace("_n96_", "_n64_"), ms=1.0,
                                                                 default="x", default_ms=1.0),
        tuning.problem_key("bwd", "bf16", 128, True, 4096): dict(config=TUNED_BWD.name.replace("causal0", "causal1"),
                                                                 ms=1.0, default="x", default_ms=1.2),
    })
    yield path
    tuning._entries_for.cache_clear()
    tuning._lookup.cache_clear()


def _qkv(seqlen=4096, d=128):
    return tuple(torch.randn(1, seqlen, 2, d, dtype=torch.bfloat16) for _ in range(3))


def test_the_dispatcher_takes_the_tuned_forward(table, monkeypatch):
    monkeypatch.setattr(interface.jit, "unserialized", lambda config, arch: config)  # (it builds a causal default)
    q, k, v = _qkv()
    assert interface.resolve_config(q, k, None, False, device_index=0, v=v) == TUNED_FWD
    # nearest tuned length in log2: 3000 -> 4096, 600 -> 512
    assert interface.resolve_config(*_qkv(3000)[:2], None, False, device_index=0) == TUNED_FWD
    assert interface.resolve_config(*_qkv(600)[:2], None, False, device_index=0).block_n == 64
    # untuned problems keep the defaults
    assert interface.resolve_config(q, k, None, True, device_index=0) != dataclasses.replace(TUNED_FWD, causal=True)
    assert interface.resolve_config(*_qkv(4096, 64)[:2], None, False, device_index=0).d_head == 64


def test_the_calls_features_go_onto_the_tuned_tiles(table):
    q, k, v = _qkv()
    mods = interface.score_mods(q, False, window_size=(64, 64), softcap=3.0, learnable_sink=torch.zeros(2))
    got = interface.resolve_config(q, k, None, False, device_index=0, mods=mods, v=v)
    assert got == dataclasses.replace(TUNED_FWD, local=True, softcap=True, sink=True)


def test_a_tuned_persistent_forward_with_dropout_takes_the_mask_warps_rule(table, monkeypatch):
    """Entries are tuned without dropout; switched on, a persistent kernel takes the producer's mask warps
    where the dispatcher's rule does (dispatch.with_mask_warps: causal rows up to 1k), else the swap."""
    monkeypatch.setattr(interface.jit, "unserialized", lambda config, arch: config)
    tuned = FwdSm90Config("bf16", 128, stages=2, persistent=True, causal=True)
    tuning.write_table(H200, {tuning.problem_key("fwd", "bf16", 128, True, n): dict(config=tuned.name, ms=1.0,
                                                                                     default="x", default_ms=1.1)
                              for n in (1024, 4096)})
    tuning._entries_for.cache_clear()
    for seqlen, mask_warps in ((1024, True), (4096, False)):
        q, k, v = _qkv(seqlen)
        mods = interface.score_mods(q, True, dropout_p=0.1, philox=(0, 0))
        got = interface.resolve_config(q, k, None, True, device_index=0, mods=mods, v=v)
        assert got == dataclasses.replace(tuned, dropout=True, mask_warps=mask_warps)


def test_the_backward_takes_the_tuned_config(table):
    assert tuning.lookup(0, "bwd", "bf16", 128, True, 4096, (("dropout", True),)) == \
        dataclasses.replace(TUNED_BWD, causal=True, dropout=True)
    assert tuning.lookup(0, "bwd", "bf16", 128, True, 4096, (), deterministic=True) is None


def test_another_gpu_or_tuned_0_ignores_the_table(table, monkeypatch):
    q, k, v = _qkv()
    monkeypatch.setenv("FLASHJIT_TUNED", "0")
    assert interface.resolve_config(q, k, None, False, device_index=0, v=v) != TUNED_FWD
    monkeypatch.delenv("FLASHJIT_TUNED")
    monkeypatch.setattr(tuning, "device_identity", lambda device_index: dict(H200, driver=13010))
    tuning._entries_for.cache_clear()
    tuning._lookup.cache_clear()
    assert tuning.lookup(0, "fwd", "bf16", 128, False, 4096) is None


def test_a_damaged_table_is_ignored_with_a_warning(table, caplog):
    table.write_text("{not json")
    tuning._entries_for.cache_clear()
    tuning._lookup.cache_clear()
    with caplog.at_level(logging.WARNING, logger="flashjit"):
        assert tuning.lookup(0, "fwd", "bf16", 128, False, 4096) is None
    assert "ignoring the tuned table" in caplog.text


def test_writes_merge_and_are_whole(table):
    tuning.write_table(H200, {tuning.problem_key("fwd", "fp16", 64, False, 1024):
                              dict(config=KernelConfig("fp16", 64).name, ms=1.0, default="x", default_ms=1.0)})
    data = json.loads(table.read_text())
    assert data["identity"] == H200 and len(data["entries"]) == 4
    assert not [p for p in table.parent.iterdir() if p.name.startswith(".tmp-")]


def test_candidates_put_the_default_first_and_fit():
    fwd = tuner.candidates("fwd", "bf16", 128, False, "sm_90a", 227 * 1024, limit=8)
    assert len(fwd) == 8 and len(set(fwd)) == 8 and isinstance(fwd[0], FwdSm90Config)
    assert fwd[1] == dataclasses.replace(fwd[0], lazy_rescale=not fwd[0].lazy_rescale)  # the rule's other side
    assert fwd[0].persistent and fwd[2] == fwd[0].one_cta_per_tile()  # what with_tile_walk runs for some grids
    short = tuner.candidates("fwd", "bf16", 64, True, "sm_90a", 227 * 1024, limit=3, seqlen=1024)
    assert short[0].two_ctas and short[2] == short[0].one_cta_per_tile() and len(short) == 3
    bwd = tuner.candidates("bwd", "bf16", 128, False, "sm_80", 99 * 1024)
    assert all(c.smem_bytes <= 99 * 1024 for c in bwd) and all(isinstance(c, BwdConfig) for c in bwd)
    assert not any(c.deterministic for c in bwd[1:])  # (the default at 99 KiB and d128 is the deterministic one)


def test_tune_without_a_gpu_says_so(monkeypatch):
    import subprocess
    import sys
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: test_tune_on_the_gpu covers it")
    result = subprocess.run([sys.executable, "-m", "flashjit", "tune", "--head-dims", "64"], capture_output=True,
                            text=True, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 1 and "no CUDA GPU is visible; nothing was tuned" in result.stderr


def test_tune_agrees_rule():
    """A candidate's result must be finite and within 5% of the default's largest magnitude: rounding
    and summation order pass, a wrong kernel does not."""
    ref = torch.randn(64, 64)
    assert tuner.agrees(ref + 1e-3 * torch.randn_like(ref), ref) and tuner.agrees(ref.to(torch.bfloat16), ref)
    assert not tuner.agrees(ref + 0.5, ref) and not tuner.agrees(torch.zeros_like(ref), ref)
    bad = ref.clone()
    bad[3, 4] = float("nan")
    assert not tuner.agrees(bad, ref)


@pytest.mark.gpu
def test_tune_skips_a_candidate_that_disagrees(private_cache, monkeypatch):
    """A candidate whose output is wrong is skipped (a warning), never timed nor stored."""
    device = torch.cuda.current_device()
    default, bad = tuner.candidates("fwd", "bf16", 64, False, "sm_90a", interface._smem_limit(device)[0],
                                    limit=3, seqlen=512)[:2]
    real = interface.forward

    def forward(*args, config=None, **kwargs):
        result = real(*args, config=config, **kwargs)
        if config == bad:
            (result[0] if isinstance(result, tuple) else result).add_(1.0)
        return result

    monkeypatch.setattr(interface, "forward", forward)
    entry = tuner.tune_problem("fwd", "bf16", 64, False, 512, device, tokens=2048, hidden=256, limit=3)
    assert entry["candidates"] == 2 and entry["config"] != bad.name and entry["default"] == default.name


@pytest.mark.gpu
def test_tune_on_the_gpu(private_cache):
    """A real (small) tuning run: every candidate compiled and timed, the default among them, the
    winner stored and then chosen by the dispatcher for that problem."""
    device = torch.cuda.current_device()
    tuning._entries_for.cache_clear()
    tuning._lookup.cache_clear()
    entry = tuner.tune_problem("fwd", "bf16", 64, False, 512, device, tokens=2048, hidden=256, limit=3)
    default = tuner.candidates("fwd", "bf16", 64, False, "sm_90a", interface._smem_limit(device)[0], seqlen=512)[0]
    assert entry["candidates"] == 3 and entry["default"] == default.name and entry["ms"] > 0
    identity = tuning.device_identity(device)
    tuning.write_table(identity, {tuning.problem_key("fwd", "bf16", 64, False, 512): entry})
    q, k, v = (torch.randn(2, 500, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    assert interface.resolve_config(q, k, None, False, v=v).name == entry["config"]
    tuning._entries_for.cache_clear()
    tuning._lookup.cache_clear()
