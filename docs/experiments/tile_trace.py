"""Where a non-causal Hopper forward's time goes around its tile transitions: clock64 stamps from
tile-trace.patch (a timing probe: each consumer warpgroup's warp 0 and the producer thread stamp their
schedule's events into a buffer passed where non-causal kernels ignore the tile walk), read back here.

Run in a tree with the patch applied (run-next.sh `trace`): for each point, the dispatcher's default kernel is
called a few times with the buffer, and per CTA and consumer warpgroup the steady step's period and each event
of a tile's transition (relative to warpgroup 0's last issue of the tile before) are summarized over the middle
rounds of every CTA (medians and quartiles, in SM cycles). Codes (kernels/fwd_sm90.cuh, patched):
  producer  0 before K_j's stage acquire, 1 K_j issued, 2 Q issued (j = first), 3 V_j issued
  producer  4 the tile decoded, 5 its Q prefetched to L2 (j = first)
  consumer  0 tile start, 1 Q landed, 2 first K landed, 3 last tile's V landed, 4 token taken (first QK^T + last
            PV issued next), 5 S ready, 6 P made (epilogue next), 7 epilogue done; step j: 8 start, 9 K_j landed,
            10 V_{j-1} landed, 11 token taken (QK^T_j + PV_{j-1} issued next), 12 S_j ready, 13 PV_{j-1} retired;
            the last tile's epilogue (in j = first's step slots): 8 entered (its Tile rebuilt), 9 O staged, 10 the
            warpgroup's barrier passed, 11 TMA store issued, 12 its smem read (thread 0)
  store warp (role 3, cross-tile kernels with one) 0 / 1 warpgroup 0's / 1's O staged, 2 the stores' reads done
"""
import argparse
import json
import statistics
import sys

import torch

import flashjit
from flashjit import dispatch, interface

SLOTS = 64 * 64 * 16  # per CTA and role: (round < 64, j < 64) x 16 codes
NAMES = {("c", 0): "tile start", ("c", 1): "Q landed", ("c", 2): "K0 landed", ("c", 3): "V(last) landed",
         ("c", 4): "token (QK0+PVlast)", ("c", 5): "S0 ready", ("c", 6): "P0 made", ("c", 7): "epilogue done",
         ("s", 8): "step1 start", ("s", 9): "K1 landed", ("s", 10): "V0 landed", ("s", 11): "token (QK1+PV0)",
         ("s", 12): "S1 ready", ("s", 13): "PV0 retired",
         ("p", 0): "prod: K0 acquire", ("p", 1): "prod: K0 issued", ("p", 2): "prod: Q issued",
         ("p", 3): "prod: V0 issued", ("p", 4): "prod: tile decoded", ("p", 5): "prod: Q prefetched",
         ("p1", 1): "prod: K1 issued", ("p1", 3): "prod: V1 issued",
         ("pl", 1): "prod: K(last) issued", ("pl", 3): "prod: V(last) issued",
         ("e", 8): "ep: entered (tile rebuilt)", ("e", 9): "ep: O staged", ("e", 10): "ep: barrier passed",
         ("e", 11): "ep: TMA store issued", ("e", 12): "ep: store read",
         ("w", 0): "store warp: WG0's O staged", ("w", 1): "store warp: WG1's O staged",
         ("w", 2): "store warp: stores read"}


def quart(xs):
    xs = sorted(xs)
    if not xs:
        return None
    return [xs[len(xs) // 4], statistics.median(xs), xs[(3 * len(xs)) // 4]]


def run_point(seqlen, batch, heads, d, dtype, calls):
    """(the stamps [grid, role, round, j, code], the dispatcher's config, the traced kernel's ms a call)."""
    q, k, v = (torch.randn(batch, seqlen, heads, d, device="cuda", dtype=dtype) for _ in range(3))
    out = flashjit.forward(q, k, v)  # compiles; the plan
    config = dispatch.default_config("bf16" if dtype == torch.bfloat16 else "fp16", d, False, seqlen,
                                     arch=dispatch.WGMMA_ARCH)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    # the launcher's grid (it drops a walk made for another): min(tiles, SMs x CTAs an SM)
    grid = min(-(-seqlen // config.block_m) * heads * batch, sms * config.ctas_per_sm)
    buf = torch.zeros(grid * 4 * SLOTS, dtype=torch.int64, device="cuda")
    orig = interface._walk
    interface._walk = lambda _config, _q, _k, _device: (buf, grid)
    interface._plans.clear()
    try:
        for _ in range(calls):
            flashjit.forward(q, k, v)
        torch.cuda.synchronize()
    finally:
        interface._walk = orig
        interface._plans.clear()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        flashjit.forward(q, k, v, out=out)
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / 20
    return buf.view(grid, 4, 64, 64, 16).cpu(), config, ms


def summarize(t, seqlen, block_n):
    grid = t.shape[0]
    jn = -(-seqlen // block_n)
    per = {}  # label -> list of cycles relative to WG0's last issue of the tile before
    steady = {0: [], 1: []}
    steady_ev = {}
    tile_cycles = []
    for cta in range(grid):
        rounds = [r for r in range(64) if int(t[cta, 1, r, 0, 1]) != 0]
        if len(rounds) < 4:
            continue
        for g in (0, 1):
            c = t[cta, 1 + g]
            for r in rounds[1:-1]:
                iss = [int(c[r, j, 11]) for j in range(1, jn)]
                steady[g] += [b - a for a, b in zip(iss[1:-1], iss[2:])]
        c0 = t[cta, 1]
        last_issue = {r: int(c0[r, jn - 1, 11]) for r in rounds}
        for r_prev, r in zip(rounds[1:-2], rounds[2:-1]):
            base = last_issue[r_prev]
            tile_cycles.append(last_issue[r] - base)
            for g in (0, 1):
                c = t[cta, 1 + g]
                for code in range(8):
                    per.setdefault((f"wg{g}", NAMES[("c", code)]), []).append(int(c[r, 0, code]) - base)
                for code in range(8, 14):
                    per.setdefault((f"wg{g}", NAMES[("s", code)]), []).append(int(c[r, 1, code]) - base)
                for code in range(8, 13):  # the epilogue's stamps (j = 0's step slots; 11-12: thread 0)
                    if int(c[r, 0, code]) != 0:
                        per.setdefault((f"wg{g}", NAMES[("e", code)]), []).append(int(c[r, 0, code]) - base)
            pr = t[cta, 0]
            for code in range(6):
                per.setdefault(("prod", NAMES[("p", code)]), []).append(int(pr[r, 0, code]) - base)
            for code in (1, 3):
                per.setdefault(("prod", NAMES[("pl", code)]), []).append(int(pr[r_prev, jn - 1, code]) - base)
            sw = t[cta, 3]  # the store warp (if any): the pending tile's (r_prev's) stores
            for code in range(3):
                if int(sw[r_prev, 0, code]) != 0:
                    per.setdefault(("store", NAMES[("w", code)]), []).append(int(sw[r_prev, 0, code]) - base)
            for code in (1, 3):
                per.setdefault(("prod", NAMES[("p1", code)]), []).append(int(pr[r, 1, code]) - base)
            # a steady step of the same tile, relative to its own issue (WG0), j = jn // 2
            j = jn // 2
            if j >= 2:
                b0 = int(c0[r, j, 11])
                for g in (0, 1):
                    c = t[cta, 1 + g]
                    for code in range(8, 14):
                        steady_ev.setdefault((f"wg{g}", NAMES[("s", code)].replace("1", "j").replace("0", "j-1")),
                                             []).append(int(c[r, j, code]) - b0)
                for code in (1, 3):
                    steady_ev.setdefault(("prod", f"prod K/V_j+? code {code}"), []).append(int(pr[r, j, code]) - b0)
    return {"period": {g: quart(v) for g, v in steady.items()}, "tile": quart(tile_cycles), "blocks": jn,
            "transition": {" / ".join(k): quart(v) for k, v in per.items()},
            "steady": {" / ".join(k): quart(v) for k, v in steady_ev.items()}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlens", default="1024,2048,4096")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    results = {}
    for s in map(int, a.seqlens.split(",")):
        t, config, ms = run_point(s, a.tokens // s, a.heads, a.head_dim, torch.bfloat16, a.calls)
        res = summarize(t, s, config.block_n)
        grid = t.shape[0]
        flops = 4 * (a.tokens // s) * a.heads * s * s * a.head_dim
        res.update(grid=grid, ms=ms, tflops=flops / ms / 1e9)
        results[s] = res
        print(f"== S={s} d={a.head_dim} grid={grid} {ms * 1e3:.1f} us {res['tflops']:.1f} TFLOP/s (traced kernel), "
              f"{res['blocks']} blocks a tile")
        print(f"  steady step period (WG0 issue to issue) q1/med/q3: {res['period'][0]}  WG1: {res['period'][1]}")
        print(f"  tile (WG0 last issue to last issue): {res['tile']}; overhead over blocks x period: "
              f"{res['tile'][1] - res['blocks'] * res['period'][0][1]:.0f} cycles "
              f"({(res['tile'][1] - res['blocks'] * res['period'][0][1]) / res['period'][0][1]:.2f} steps)")
        print("  transition events, cycles after WG0's last issue of the tile before (q1 / median / q3):")
        for k, v in sorted(res["transition"].items(), key=lambda kv: kv[1][1] if kv[1] else 0):
            print(f"    {k:40s} {v}")
        print("  a steady step (j = blocks / 2), cycles after WG0's issue of it:")
        for k, v in sorted(res["steady"].items(), key=lambda kv: kv[1][1] if kv[1] else 0):
            print(f"    {k:40s} {v}")
        sys.stdout.flush()
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
