"""transformers benchmark: a Llama (4 layers, hidden 2048, 16 heads of dim 128 sharing --kv-heads key/value
heads, bf16, random init from its config) with attn_implementation="sdpa" vs flashjit's ("fjit", flashjit.integrations.transformers),
one model switched between the two with set_attn_implementation (the same weights):

- a training step (forward + backward of the LM loss, no KV cache) at [1, 4096] and [4, 2048];
- a forward over a left-padded batch [8, 1024] (row i padded by 96 i tokens). flashjit runs padding
  through flashjit.flash_attn_varlen_func; without it that point is skipped for flashjit, with a message.

Times: CUDA events around each iteration, the median of --iters after --warmup (the warmup also
compiles flashjit's kernels), taken --rounds times for each implementation in turn, and the median of
those; peak memory allocated. Prints a table and writes
bench_transformers.json to --out. The loss of both implementations is printed as a sanity check.

    python scripts/bench_transformers.py --out bench-out
    python scripts/bench_transformers.py --iters 20 --layers 8
    python scripts/bench_transformers.py --host   # is the step host-bound? its syncs
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

from bench_forward import _require_torch_cuda, exit_unless_gpu, time_rounds  # same folder

if __name__ == "__main__" and not {"-h", "--help"} & set(sys.argv[1:]):
    exit_unless_gpu("bench_transformers.py")  # before the heavy imports: one line, no traceback

import torch  # noqa: E402

os.environ.setdefault("FLASHJIT_BACKEND", "jit")
import flashjit  # noqa: E402

TRAIN_SHAPES = [(1, 4096), (4, 2048)]
PADDED_SHAPE, PAD_STEP = (8, 1024), 96


def time_ms(fn, warmup: int, iters: int) -> tuple[float, float]:
    """(median ms over iters, peak GiB allocated), CUDA events around each call of fn (flashjit.tuner's)."""
    from flashjit.tuner import time_ms as median_ms

    torch.cuda.reset_peak_memory_stats()
    return median_ms(fn, warmup, iters), torch.cuda.max_memory_allocated() / 2**30


def host_figures(fn, iters: int) -> dict:
    """Whether the host bounds fn: the host time a call takes to issue its work when calls follow each
    other without a sync, and the synchronising torch calls inside one call
    (torch.cuda.set_sync_debug_mode). With no sync, an issue time close to the measured time means
    the GPU waits for the host; each sync makes the host wait for the GPU (so the issue time then
    includes GPU time) and after it the GPU runs at the host's pace until the host is ahead again.
    Syncs outside torch (ctypes) are not seen."""
    import time
    import warnings

    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    issue_ms = (time.perf_counter() - start) * 1e3 / iters
    torch.cuda.synchronize()
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(before)
    return {"issue_ms": issue_ms, "syncs": sum("synchronizing" in str(w.message) for w in caught)}


def kernel_totals(fn) -> dict:
    """{CUDA kernel name: total us} over one call of fn, from torch.profiler (host gaps are not kernels:
    compare the sum with the measured time to see them)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    totals = {}
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if us and event.device_type.name == "CUDA":
            totals[event.key[:70]] = totals.get(event.key[:70], 0.0) + us
    return totals


def print_kernel_diff(sdpa: dict, ours: dict, name: str, top: int = 8) -> None:
    """The kernels (by name) whose per-step totals differ most, and each side's sum."""
    keys = sorted(set(sdpa) | set(ours), key=lambda k: -abs(ours.get(k, 0.0) - sdpa.get(k, 0.0)))
    print(f"    kernel totals: sdpa {sum(sdpa.values()) / 1e3:.2f} ms, {name} {sum(ours.values()) / 1e3:.2f} ms; "
          "largest differences (us):")
    for key in keys[:top]:
        print(f"    {sdpa.get(key, 0.0):9.0f} {ours.get(key, 0.0):9.0f}  {key}")


def cell(result, key: str, fmt: str) -> str:
    return format(result[key], fmt) if result else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="folder for bench_transformers.json")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=16, help="key/value heads of the 16 query heads (GQA below 16)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profile", action="store_true",
                        help="after timing, print each case's CUDA kernels whose totals differ most between the two")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5,
                        help="time sdpa and flashjit this many times each, interleaved; report each one's median")
    parser.add_argument("--host", action="store_true",
                        help="after timing, also print the host time a call takes to issue its work and the "
                             "synchronising torch calls in one call (is the host the bound?)")
    args = parser.parse_args()
    _require_torch_cuda("bench_transformers.py")
    import transformers
    from transformers import AutoModelForCausalLM, LlamaConfig

    from flashjit.integrations.transformers import register, varlen_func

    name = register()
    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=args.layers,
                         num_attention_heads=16, num_key_value_heads=args.kv_heads, max_position_embeddings=8192, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16).cuda()
    has_varlen = varlen_func() is not None

    cases = []  # (label, needs varlen, fn(model) -> loss or None)
    for batch, seqlen in TRAIN_SHAPES:
        ids = torch.randint(1, config.vocab_size, (batch, seqlen), device="cuda")

        def train_step(ids=ids):
            model.zero_grad(set_to_none=True)
            loss = model(ids, labels=ids, use_cache=False).loss
            loss.backward()
            return loss
        cases.append((f"train step [{batch}, {seqlen}]", False, train_step))
    batch, seqlen = PADDED_SHAPE
    ids = torch.randint(1, config.vocab_size, (batch, seqlen), device="cuda")
    mask = (torch.arange(seqlen, device="cuda")[None] >= PAD_STEP * torch.arange(batch, device="cuda")[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)

    @torch.no_grad()
    def padded_forward():
        labels = ids.masked_fill(~(mask.bool() & mask.bool().roll(1, 1)), -100)  # real tokens predicting real tokens
        return model(ids, attention_mask=mask, labels=labels, use_cache=False).loss
    cases.append((f"padded forward [{batch}, {seqlen}] (left)", True, padded_forward))

    rows = []
    print(f"{torch.cuda.get_device_name()}: Llama {args.layers} layers, hidden 2048, 16 heads x d128, bf16; "
          f"median of {args.iters} iterations, of {args.rounds} interleaved rounds")
    print(f"{'case':<34} {'sdpa ms':>9} {name + ' ms':>9} {'speedup':>8} {'sdpa GiB':>9} {name + ' GiB':>9}  loss diff")
    for label, needs_varlen, fn in cases:
        row = {"case": label}
        losses = {}
        for implementation in ("sdpa", name):
            if implementation == name and needs_varlen and not has_varlen:
                print(f"    ({name} skipped for {label}: flashjit has no flash_attn_varlen_func, which padding needs)")
                row[implementation] = None
                continue
            model.set_attn_implementation(implementation)
            try:
                losses[implementation] = fn().item()
            except (RuntimeError, NotImplementedError, ValueError) as exc:
                print(f"    ({implementation} failed on {label}: {str(exc).splitlines()[0][:120]})")
                row[implementation] = None

        def timed(implementation, fn=fn, label=label):
            model.set_attn_implementation(implementation)
            try:
                return time_ms(fn, args.warmup, args.iters)
            except (RuntimeError, NotImplementedError, ValueError) as exc:  # then no further rounds of it
                print(f"    ({implementation} failed on {label}: {str(exc).splitlines()[0][:120]})")
                return None
        # Interleaved rounds: a step's time drifts by a few percent between passes, as much as the two
        # implementations differ, so each round times both.
        timings = time_rounds({impl: functools.partial(timed, impl) for impl in losses}, args.rounds, lambda f: f())
        for implementation, (median, samples) in timings.items():
            if median is None:
                row[implementation] = None
                continue
            row[implementation] = {"ms": median[0], "peak_gib": max(gib for _, gib in samples),
                                   "rounds_ms": [round(m, 3) for m, _ in samples]}
            model.set_attn_implementation(implementation)
            if args.profile:
                row[implementation]["kernels_us"] = kernel_totals(fn)
            if args.host:
                row[implementation].update(host_figures(fn, args.iters))
        rows.append(row)
        s, f = row.get("sdpa"), row.get(name)
        speedup = f"{s['ms'] / f['ms']:.2f}x" if s and f else "-"
        spread = ""
        if s and f and args.rounds > 1:  # each round's own ratio: how far the median can be trusted
            ratios = [a / b for a, b in zip(s["rounds_ms"], f["rounds_ms"])]
            spread = f"  (rounds {min(ratios):.2f}-{max(ratios):.2f}x)"
        diff = f"{abs(losses['sdpa'] - losses[name]):.1e}" if len(losses) == 2 else "-"
        print(f"{label:<34} {cell(s, 'ms', '9.2f'):>9} {cell(f, 'ms', '9.2f'):>9} {speedup:>8} "
              f"{cell(s, 'peak_gib', '9.2f'):>9} {cell(f, 'peak_gib', '9.2f'):>9}  {diff}{spread}")
        if args.host and s and f:
            waits = " (a sync in the call: its issue time includes waiting for the GPU)" if s["syncs"] or f["syncs"] else ""
            print(f"    host: issue {s['issue_ms']:.2f} / {f['issue_ms']:.2f} ms a call (sdpa / {name}), "
                  f"syncs {s['syncs']} / {f['syncs']}{waits}")
        if args.profile and s and f:
            print_kernel_diff(s["kernels_us"], f["kernels_us"], name)

    args.out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "transformers": transformers.__version__, "flashjit": flashjit.__version__, "name": name,
              "layers": args.layers, "warmup": args.warmup, "iters": args.iters, "rounds": args.rounds,
              "has_varlen": has_varlen,
              "rows": rows}
    path = args.out / "bench_transformers.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
