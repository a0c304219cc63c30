"""Instrument kernels/fwd_sm90.cuh of a variant tree (run inside it) with tile_trace.py's clock64 stamps: a
timing probe, never landed. The stamps go to the buffer tile_trace.py passes as FwdParams::tile_walk, which
non-causal kernels ignore (causal ones keep using it as their walk, unstamped). Edits by anchors, so that it
applies to main and to a variant of it alike; an anchor that is missing fails loudly."""
import re
import sys

PATH = "kernels/fwd_sm90.cuh"
s = open(PATH).read()


def rep(old, new, regex=False):
    global s
    n = len(re.findall(old, s)) if regex else s.count(old)
    if n != 1:
        sys.exit(f"tile_trace_instrument: anchor found {n} times: {old[:80]!r}")
    s = re.sub(old, lambda _: new, s) if regex else s.replace(old, new)


rep("// The shared memory: the Q ring", r'''// TIMING PROBE ONLY (tile_trace_instrument.py): clock64 stamps of a non-causal kernel's schedule into the
// buffer passed as p.tile_walk: per CTA and role (0 producer, 1 + g consumer warpgroup g), per (round, key
// block j) 16 slots, one per event code.
template <class C>
struct Trace {
  unsigned long long* base;
  __device__ __forceinline__ Trace(const FwdParams& p, int role) {
    base = (!C::kCausal && p.tile_walk != nullptr)
               ? reinterpret_cast<unsigned long long*>(const_cast<int32_t*>(p.tile_walk)) +
                     (size_t(blockIdx.x) * 4 + role) * (64 * 64 * 16)
               : nullptr;
  }
  __device__ __forceinline__ void rec(int round, int j, int code) const {
    if (base != nullptr && round < 64 && j < 64) {
      unsigned long long c;
      asm volatile("mov.u64 %0, %%clock64;" : "=l"(c)::"memory");
      base[(round * 64 + j) * 16 + code] = c;
    }
  }
};

// The shared memory: the Q ring''')
# producer
# (the V load: plain, or kLateV's choice of holding a tile's last V back)
m = re.search(r"\n    for \(int j = T\.j_begin; j < T\.j_end; \+\+j, st\.advance\(\)\) \{\n"
              r"(      load\(&args\.k, [^;]*;\n)(      if \(j == T\.j_begin\)\n        load\(&args\.q,[^;]*;\n)"
              r"(      (?:load\(&args\.v,[^;]*;|if \(kLateV[^\n]*\n      else load_v\([^;]*;)\n)    \}", s)
if not m:
    sys.exit("tile_trace_instrument: the producer's key loop not found")
qload = m.group(2).replace("      if (j == T.j_begin)\n", "      if (j == T.j_begin) {\n") + \
    "        tr.rec(round, j, 2);\n      }\n"
s = s[:m.start()] + ("\n    for (int j = T.j_begin; j < T.j_end; ++j, st.advance()) {\n      tr.rec(round, j, 0);\n" +
                     m.group(1) + "      tr.rec(round, j, 1);\n" + qload + m.group(3) +
                     "      tr.rec(round, j, 3);\n    }") + s[m.end():]
# the producer's walk: its trace made before the tile loop
at = s.index("  for (int round = 0, tile = tile_of<C>(p, 0, num_tiles);", s.index("void produce("))
s = s[:at] + "  const Trace<C> tr(p, 0);\n" + s[at:]
# kLateV: a tile's last V is issued at the next tile's decode; its code-3 stamp is rewritten then
if "constexpr bool kLateV" in s:
    rep("  int v_row = -1, v_head = 0, v_b = 0;\n", "  int v_row = -1, v_head = 0, v_b = 0, tr_r = 0, tr_j = 0;\n")
    rep("v_b = T.tma_b, v_st = st;\n", "v_b = T.tma_b, v_st = st, tr_r = round, tr_j = j;\n")
    rep("    if (kLateV && v_row >= 0) load_v(v_st, v_row, v_head, v_b), v_row = -1;\n",
        "    if (kLateV && v_row >= 0) load_v(v_st, v_row, v_head, v_b), v_row = -1, tr.rec(tr_r, tr_j, 3);\n")
rep("""    if (T.skipped()) continue;
    // Persistent: this tile's Q waits""", """    if (T.skipped()) continue;
    tr.rec(round, 0, 4);
    // Persistent: this tile's Q waits""")
m = re.search(r"      for \(int c = 0; c < C::kD / 64; \+\+c\) tma_prefetch_l2_4d\(&args\.q[^;]*;\n", s)
s = s[:m.end()] + "    tr.rec(round, 0, 5);\n" + s[m.end():]
# consumers
rep("  const int g = wg - 1, t = tid % 128, lane = t & 31;\n", """  const int g = wg - 1, t = tid % 128, lane = t & 31;
  const Trace<C> tr(p, 1 + g);
  auto rec = [&](int round, int j, int code) {
    if (t == 0) tr.rec(round, j, code);
  };
""")
rep("""    const int row0 = T.q_row0 + row_cta;  // this warp's first row, globally
    sm.q_ring->wait(qs);""", """    const int row0 = T.q_row0 + row_cta;  // this warp's first row, globally
    rec(round, T.j_begin, 0);
    sm.q_ring->wait(qs);
    rec(round, T.j_begin, 1);""")
m = re.search(r"        constexpr bool kChained = decltype\(chained\)::value;\n(?:.*\n){0,3}?        sm\.k_ring->wait\(st\);\n", s)
s = s[:m.end()] + "        rec(round, T.j_begin, 2);\n" + s[m.end():]
m = re.search(r"(        if constexpr \(kChained\) \{\n          sm\.v_ring->wait\(prev\);\n(?:.*\n)*?        \}\n)(        take_token\(\);\n)", s)
s = s[:m.start()] + m.group(1) + "        rec(round, T.j_begin, 3);\n" + m.group(2) + "        rec(round, T.j_begin, 4);\n" + s[m.end():]
rep("""        wgmma_wait<kChained ? 1 : 0>();  // S is ready; the pending PV may still run
        wgmma_settle(s[0]);
""", """        wgmma_wait<kChained ? 1 : 0>();  // S is ready; the pending PV may still run
        wgmma_settle(s[0]);
        rec(round, T.j_begin, 5);
""")
m = re.search(r"        if constexpr \(kChained\)\s*(epilogue<C[^>]*>)\(args, sm, (Tile<C>\([^)]*\)), q_pending, o, m, l, scale, g, t"
              r"(, rcp)?\);\n", s)
s = s[:m.start()] + ("        rec(round, T.j_begin, 6);\n        if constexpr (kChained) " + m.group(1) + "(args, sm, " + m.group(2) +
                     ", q_pending, o, m, l, scale, g, t" + (m.group(3) or ", {}") + ", round);\n"
                     "        rec(round, T.j_begin, 7);\n") + s[m.end():]
rep("""        constexpr int kN = decltype(half)::value ? C::kHalfN : C::kBlockN;
        sm.k_ring->wait(st);
        sm.v_ring->wait(prev);
        take_token();
""", """        constexpr int kN = decltype(half)::value ? C::kHalfN : C::kBlockN;
        rec(round, j, 8);
        sm.k_ring->wait(st);
        rec(round, j, 9);
        sm.v_ring->wait(prev);
        rec(round, j, 10);
        take_token();
        rec(round, j, 11);
""")
rep("""        wgmma_wait<1>();  // S_j is ready; PV_{j-1} may still run
        wgmma_settle(s[0]);
""", """        wgmma_wait<1>();  // S_j is ready; PV_{j-1} may still run
        wgmma_settle(s[0]);
        rec(round, j, 12);
""")
rep("""        wgmma_wait<0>();
        wgmma_settle(o[0]);
        sm.v_ring->release(prev);
        q_done(j);""", """        wgmma_wait<0>();
        wgmma_settle(o[0]);
        rec(round, j, 13);
        sm.v_ring->release(prev);
        q_done(j);""")
# the epilogue
m = re.search(r"(const float \(&m\)\[1\]\[2\], const float \(&l\)\[1\]\[2\], float scale, int g, int t)"
              r"(,\s*const float \(&rcp\)\[2\] = \{\})?\) \{\n((?:  static_assert[^;]*;\n)?)  const FwdParams& p = args\.p;\n", s)
s = s[:m.start()] + m.group(1) + (m.group(2) or ",\n                                         const float (&rcp)[2] = {}") + \
    (", int round = 63) {\n" + m.group(3) + "  const FwdParams& p = args.p;\n"
     "  const Trace<C> tr(p, 1 + g);\n  if (t == 0) tr.rec(round, 0, 8);\n") + s[m.end():]
anchor9 = "  if constexpr (C::kStoreWarp) {\n" if "  if constexpr (C::kStoreWarp) {\n" in s else "  if (!direct) {\n    fence"
m = s.index(anchor9)
s = s[:m] + "  if (t == 0) tr.rec(round, 0, 9);\n" + s[m:]
rep("""  if (!direct) {
    fence_proxy_async();  // the stores above, visible to the TMA unit
    named_sync(int(Barrier::kEpilogue) + g, 128);
""", """  if (!direct) {
    fence_proxy_async();  // the stores above, visible to the TMA unit
    named_sync(int(Barrier::kEpilogue) + g, 128);
    if (t == 0) tr.rec(round, 0, 10);
""")
m = re.search(r"      tma_store_commit\(\);\n(      (?:if \(!kDeferRelease\) )?tma_store_wait_read\(\);\n)", s)
s = s[:m.start()] + "      tma_store_commit();\n      tr.rec(round, 0, 11);\n" + m.group(1) + "      tr.rec(round, 0, 12);\n" + s[m.end():]
# the store warp (Config::kStoreWarp), role 3 (two consumer warpgroups): per tile, 0 / 1 each warpgroup's O
# staged (its wait done), 2 the stores' reads done (the Q stage released next)
if "void store_tiles(" in s:
    rep("""  RingState<C::kQStages> qs;
  for (int round = 0, tile = tile_of<C>(p, 0, num_tiles); tile < num_tiles; tile = tile_of<C>(p, ++round, num_tiles)) {
    const Tile<C> T(args, tile);
    if (T.skipped()) continue;
    const bool direct""", """  RingState<C::kQStages> qs;
  const Trace<C> tr(p, 3);
  for (int round = 0, tile = tile_of<C>(p, 0, num_tiles); tile < num_tiles; tile = tile_of<C>(p, ++round, num_tiles)) {
    const Tile<C> T(args, tile);
    if (T.skipped()) continue;
    const bool direct""")
    rep("""      mbarrier_wait(sm.o_ready(qs.stage, g), qs.phase);
""", """      mbarrier_wait(sm.o_ready(qs.stage, g), qs.phase);
      if (C::kConsumers == 2) tr.rec(round, 0, g);
""")
    rep("""    tma_store_wait_read();
    sm.q_ring->release(qs);""", """    tma_store_wait_read();
    if (C::kConsumers == 2) tr.rec(round, 0, 2);
    sm.q_ring->release(qs);""")
open(PATH, "w").write(s)
print("tile_trace_instrument: kernels/fwd_sm90.cuh stamped")
