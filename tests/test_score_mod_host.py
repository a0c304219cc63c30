"""kernels/common/score_mod.cuh's masks checked on the CPU: the header compiled as host C++ (its device
qualifiers defined away) and compared with its own visible() over every (query, key) of many random and
edge-case blocks. The GPU tests see these functions only through whole kernels and a few shapes; a wrong
bound here (a window clamp, an off-by-one at the diagonal) would show there only where a shape happens
to hit it. Needs a host C++ compiler (CI has the one cpp_extension uses), not a GPU."""
from __future__ import annotations

import pytest

from host_cxx import run_program

# One program: for each (causal, local) it draws shapes (Sq, Sk), windows (unbounded, small, huge) and
# blocks, and counts the entries where a range (key_range, query_range) disagrees with visible(); for block_needs_mask, the
# blocks it lets through unmasked that hold an invisible entry. Prints "<check> <mismatches> <cases>".
PROGRAM = r"""
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
using std::max;
using std::min;
#define __device__
#define __forceinline__ inline
#define __CUDACC__
#include "common/score_mod.cuh"
using namespace flashjit;

struct Counts { long bad = 0, cases = 0; };

template <bool kCausal, bool kLocal>
void check(std::mt19937& rng, long trials, Counts& keys, Counts& queries, Counts& blocks) {
  std::uniform_int_distribution<int> len(1, 3000), win(-1, 700), pick(0, 9), rows(1, 192), cols(1, 256);
  for (long t = 0; t < trials; ++t) {
    ScoreParams m{};
    const int sq = len(rng), sk = pick(rng) == 0 ? sq : len(rng);
    m.window_left = kLocal ? (pick(rng) == 0 ? 2000000000 : win(rng)) : -1;  // huge: clamped, still unbounded
    m.window_right = kLocal ? (pick(rng) == 1 ? 2000000000 : win(rng)) : -1;
    const ScoreMod<kCausal, kLocal, false, false> mod(m, sq, sk, 1.f, 0, 0);
    // key_range<kCols>(i0, j): the queries i0 + c that key j sees (the dK/dV kernels' rows are keys)
    std::uniform_int_distribution<int> key(0, sk + 64), query(-64, sq + 64);
    const int j = key(rng), i0 = query(rng) / 2 * 2;
    const auto range = mod.template key_range<128>(i0, j);
    for (int c = 0; c < 128; ++c) keys.bad += range.visible(c) != mod.visible(i0 + c, j);
    ++keys.cases;
    // query_range(i, j0): the keys j0 + c that query i sees (the forwards' rows are queries; j0 even)
    const int i = std::uniform_int_distribution<int>(0, sq - 1)(rng), j0 = (key(rng) - 8) / 2 * 2;
    const auto row = mod.query_range(i, j0);
    for (int c = 0; c < 256; ++c) queries.bad += row.visible(c) != mod.visible(i, j0 + c);
    ++queries.cases;
    // block_needs_mask(row0, rows, col0, cols) false: every entry of the block visible
    const int row0 = std::uniform_int_distribution<int>(0, sq - 1)(rng), col0 = std::uniform_int_distribution<int>(0, sk)(rng);
    const int r = rows(rng), n = cols(rng);
    if (!mod.block_needs_mask(row0, r, col0, n)) {
      bool hidden = false;
      for (int i = row0; i < row0 + r && !hidden; ++i)
        for (int jj = col0; jj < col0 + n && !hidden; ++jj) hidden = !mod.visible(i, jj);
      blocks.bad += hidden;
    }
    ++blocks.cases;
  }
}

int main() {
  std::mt19937 rng(20261204);
  Counts keys, queries, blocks;
  const long n = 100000;
  check<false, false>(rng, n, keys, queries, blocks);
  check<true, false>(rng, n, keys, queries, blocks);
  check<false, true>(rng, n, keys, queries, blocks);
  check<true, true>(rng, n, keys, queries, blocks);
  std::printf("key_range %ld %ld\nquery_range %ld %ld\nblock_needs_mask %ld %ld\n", keys.bad, keys.cases, queries.bad,
              queries.cases, blocks.bad, blocks.cases);
  return 0;
}
"""


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    run = run_program(tmp_path_factory, "score_mod", PROGRAM, "kernels/common/score_mod.cuh")
    return {name: (int(bad), int(cases)) for name, bad, cases in (line.split() for line in run.stdout.splitlines())}


def test_key_range_is_visible_along_a_key(results):
    """The dK/dV kernels' rows are keys: key_range(i0, j) gives the queries i0 + c key j sees as lo <= c <= hi
    (two compares an entry instead of visible()'s sums); it must agree with visible() everywhere."""
    bad, cases = results["key_range"]
    assert cases == 400000 and bad == 0, f"{bad} entries of {cases} blocks x 128 queries differ from visible()"


def test_query_range_is_visible_along_a_query(results):
    """The forwards' rows are queries: query_range(i, j0) gives the keys j0 + c query i sees as lo <= c <= hi
    (apply_score_mod's mask: one range a row, a compare an entry); it must agree with visible() everywhere."""
    bad, cases = results["query_range"]
    assert cases == 400000 and bad == 0, f"{bad} entries of {cases} rows x 256 keys differ from visible()"


def test_block_needs_mask_never_skips_an_invisible_entry(results):
    """A block that block_needs_mask lets through unmasked must hold no invisible entry (it may ask for the
    mask where none is needed: that costs time, not correctness)."""
    bad, cases = results["block_needs_mask"]
    assert cases == 400000 and bad == 0, f"{bad} of {cases} unmasked blocks hold an invisible entry"
