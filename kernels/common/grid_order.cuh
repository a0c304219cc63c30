// The launch order of a causal grid: `rows` rows (a batch entry and head each) of `blocks` CTAs,
// block 0 the longest (the most key or query blocks to walk), CTAs handed to SMs in launch order.
#pragma once

namespace flashjit {

struct GridPos {
  int row, block;  // block: 0 = the row's longest CTA
};

#ifdef __CUDACC__  // device code (the launcher's host-only build skips it: common/launch.cuh)
// CTA `index` of the grid. Rows run one after another with their blocks together, longest first (a
// row's CTAs share its K/V, or Q/dO, in L2), except the last `tail` rows, which run block-outermost,
// so that the last waves hold only short CTAs instead of some rows' long ones. tail: two waves of
// CTAs (2 x the SMs, %nsmid) worth of rows. A greedy schedule (docs/perf-log.md, fifteenth session)
// ends at 1.04-1.14x the ideal with every row together, 1.003-1.024x so, with no more L2 misses
// (every row block-outermost: 1.00-1.02x, but 4-10x the K/V misses).
__device__ __forceinline__ GridPos longest_first(int index, int rows, int blocks) {
  unsigned sms;
  asm("mov.u32 %0, %%nsmid;" : "=r"(sms));
  const int tail = min(rows, (2 * int(sms) + blocks - 1) / blocks);
  const int together = (rows - tail) * blocks;
  if (index < together) return {index / blocks, index % blocks};
  const int rest = index - together;
  return {rows - tail + rest % tail, rest / tail};
}
#endif  // __CUDACC__

}  // namespace flashjit
