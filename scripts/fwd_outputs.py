"""Forward outputs of fixed inputs, saved to compare two source trees bit for bit.

For a kernel change meant to change no bit (a reordering, products of zeros left out): run this from
each tree (`PYTHONPATH=<tree> python3 <tree>/scripts/fwd_outputs.py --save <tree>.pt`), then
`--compare a.pt b.pt` lists every (config, shape) whose out or lse differ. Inputs are seeded per shape,
so both runs see the same ones. The default configs are the dispatcher's for d64 / d128 causal and not
(short and long rows) and a windowed one, on lengths where the causal diagonal and the key blocks do not
line up (Sq != Sk, no multiple of the tiles), GQA, for the GPU's arch; `--configs NAME ...` takes kernel
names instead.

    python3 scripts/fwd_outputs.py --save main.pt
    python3 scripts/fwd_outputs.py --compare main.pt change.pt
"""
from __future__ import annotations

import argparse
import sys

SHAPES = [  # batch, Sq, Sk, heads, kv heads
    (2, 1000, 777, 8, 2), (1, 1024, 1024, 16, 16), (2, 333, 901, 4, 1), (1, 2048, 2048, 8, 8),
    (3, 700, 1300, 4, 4), (1, 129, 64, 2, 2), (2, 4100, 4100, 4, 2)]
WINDOW = (300, 11)


def default_configs(arch: str):
    from flashjit.dispatch import default_config

    configs = [default_config("bf16", d, causal, seqlen, arch=arch)
               for d in (64, 128) for causal in (True, False) for seqlen in (1024, 2048, 8192)]
    configs.append(default_config("bf16", 128, False, 4096, arch=arch, local=True))
    return list(dict.fromkeys(configs))  # distinct, in order


def save(path: str, names: list[str]) -> None:
    import torch

    import flashjit
    from flashjit import jit
    from flashjit.configs import config_from_name

    configs = [config_from_name(n) for n in names] if names else default_configs(jit.arch_for(0))
    results = {}
    for config in configs:
        for seed, shape in enumerate(SHAPES):
            batch, sq, sk, heads, heads_k = shape
            gen = torch.Generator(device="cuda").manual_seed(seed)
            q = torch.randn(batch, sq, heads, config.d_head, device="cuda", generator=gen).to(torch.bfloat16)
            k, v = (torch.randn(batch, sk, heads_k, config.d_head, device="cuda", generator=gen).to(torch.bfloat16)
                    for _ in range(2))
            window = WINDOW if getattr(config, "local", False) else (-1, -1)
            out, lse = flashjit.forward(q, k, v, config=config, causal=config.causal, window_size=window,
                                        return_lse=True)
            results[(config.name, shape)] = (out.cpu(), lse.cpu())
    torch.save(results, path)
    print(f"{len(results)} outputs of {len(configs)} configs to {path}")


def compare(a: str, b: str) -> int:
    import torch

    left, right = torch.load(a), torch.load(b)
    differ = [key for key in left if key in right and not all(
        torch.equal(x, y) for x, y in zip(left[key], right[key]))]
    missing = sorted(set(left) ^ set(right), key=str)
    for key in differ:
        (out_a, lse_a), (out_b, lse_b) = left[key], right[key]
        print(f"differs: {key}: out max |diff| {(out_a.float() - out_b.float()).abs().max().item():.3g}, "
              f"lse {(lse_a - lse_b).abs().max().item():.3g}")
    for key in missing:
        print(f"only in one file: {key}")
    print(f"{len(left) - len(differ)} of {len(left)} equal bit for bit")
    return 1 if differ or missing else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--save", metavar="FILE", help="run the forwards and save their outputs here")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two saved files")
    parser.add_argument("--configs", nargs="*", default=[], help="kernel names instead of the default set")
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare)
    if not args.save:
        parser.error("--save FILE or --compare A B")
    from bench_forward import _require_torch_cuda, exit_unless_gpu  # same folder

    exit_unless_gpu("fwd_outputs.py")
    _require_torch_cuda("fwd_outputs.py")
    save(args.save, args.configs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
