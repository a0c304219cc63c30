"""kernels/common/fast_div.cuh checked on the CPU: FastDiv (the Hopper forward's tile decode divides by it) compiled
as host C++ and compared with / and % over every divisor up to 4096, the powers of two and their neighbours, and
random divisors up to 2^31 - 1, each at the edges (0, d - 1, d, d + 1, multiples, 2^31 - 1) and random
numerators. A wrong multiplier or shift would put a tile on the wrong (batch, head) or query block, which the
GPU tests see only at the shapes they run. Needs a host C++ compiler (CI has the one cpp_extension uses), not
a GPU."""
from __future__ import annotations

import pytest

from host_cxx import run_program

# Prints "<mismatches> <cases>"; the first mismatch, if any, on stderr.
PROGRAM = r"""
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>
#define __host__
#define __device__
#define __forceinline__ inline
#include "common/fast_div.cuh"
using flashjit::FastDiv;

int main() {
  std::mt19937_64 rng(20261206);
  std::vector<uint32_t> divisors;
  for (uint32_t d = 1; d <= 4096; ++d) divisors.push_back(d);
  for (int k = 12; k < 31; ++k) for (int e = -1; e <= 1; ++e) divisors.push_back((1u << k) + e);
  divisors.push_back(0x7fffffffu);
  std::uniform_int_distribution<uint32_t> big(1, 0x7fffffffu), num(0, 0x7fffffffu);
  for (int i = 0; i < 20000; ++i) divisors.push_back(big(rng));
  long bad = 0, cases = 0;
  for (uint32_t d : divisors) {
    const FastDiv f = FastDiv::of(d);
    std::vector<uint32_t> ns = {0, 1, d - 1, d, d + 1, 2 * d - 1, 2 * d, 0x7fffffffu, 0x7ffffffeu};
    for (uint32_t m = 3; m < 40; m += 7)
      if (uint64_t(m) * d < 0x80000000ull) ns.push_back(m * d), ns.push_back(m * d - 1);
    for (int i = 0; i < 64; ++i) ns.push_back(num(rng));
    for (uint32_t n : ns) {
      if (n > 0x7fffffffu) continue;
      const int q = f.div(int(n)), r = f.mod(int(n), q);
      ++cases;
      if (q != int(n / d) || r != int(n % d)) {
        if (bad++ == 0) std::fprintf(stderr, "%u / %u: %d rem %d\n", n, d, q, r);
      }
    }
  }
  std::printf("%ld %ld\n", bad, cases);
  return 0;
}
"""


@pytest.fixture(scope="module")
def counts(tmp_path_factory) -> tuple[int, int, str]:
    run = run_program(tmp_path_factory, "fast_div", PROGRAM, "kernels/common/fast_div.cuh")
    bad, cases = map(int, run.stdout.split())
    return bad, cases, run.stderr


def test_fast_div_matches_integer_division(counts):
    """div and mod equal / and % for every divisor and numerator drawn (0 <= n < 2^31, 1 <= d < 2^31)."""
    bad, cases, first = counts
    assert cases > 1_500_000 and bad == 0, f"{bad} of {cases} divisions wrong; first: {first}"
