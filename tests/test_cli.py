"""The command line and the scripts' behaviour without a GPU. CPU tier except one `compile` test
(one cheap real compile), each command run as a user runs it: a fresh `python -m flashjit`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flashjit import KernelConfig, __version__, __main__ as cli, jit, toolchain
from flashjit.configs.common import smem_limit_for_arch
from flashjit.dispatch import get_kernels_to_build

REPO = Path(__file__).resolve().parents[1]
CHEAP = KernelConfig(dtype="fp16", d_head=32, B_r=64, B_c=64, n_warps=4)  # ~1.5 s to compile
SM90_SET = [c.name for c in get_kernels_to_build(smem_limit_for_arch("sm_90a"), "sm_90a")]


def run(*args, env=None, python_flags=()):
    return subprocess.run([sys.executable, *python_flags, "-m", "flashjit", *args], cwd=REPO, capture_output=True,
                          text=True, env=dict(os.environ, **(env or {})), timeout=300)


def test_version():
    for result in (run("--version"), subprocess.run(["flashjit", "--version"], capture_output=True, text=True)
                   if any((Path(p) / "flashjit").exists() for p in os.environ["PATH"].split(os.pathsep)) else None):
        if result is not None:
            assert result.returncode == 0 and result.stdout.strip() == f"flashjit {__version__}"


def test_every_subcommand_and_option_has_help():
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict))
    assert set(subparsers.choices) == {"info", "precompile", "cache", "check", "tune", "run"}
    assert all(choice.help for choice in subparsers._choices_actions)
    for name, sub in [("", parser), *subparsers.choices.items()]:
        for action in sub._actions:
            assert action.help, f"`{name}` option {action.option_strings or action.dest} has no help text"


def test_list_is_the_build_set_with_the_arch(private_cache):
    result = run("precompile", "--arch", "sm_90a", "--list", env={"PATH": ""})  # no nvcc needed, nothing built
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines == [f"sm_90a  {name}" for name in SM90_SET]
    assert f"{len(SM90_SET)} kernels for sm_90a" in result.stderr and "nothing compiled" in result.stderr
    assert not list(private_cache.rglob("kernel.so"))


@pytest.mark.parametrize("filters, expect", [
    (["bwd_*"], lambda n: n.startswith("bwd_")),                       # glob
    (["_d128_"], lambda n: "_d128_" in n),                               # substring
    (["*_wgmma", "fwd_bf16_d64_"], lambda n: n.endswith("_wgmma") or "fwd_bf16_d64_" in n),  # any of several
])
def test_filters(filters, expect):
    args = [arg for f in filters for arg in ("--filter", f)]
    result = run("precompile", "--arch", "sm_90a", "--list", *args)
    assert result.returncode == 0, result.stderr
    listed = [line.split()[1] for line in result.stdout.splitlines()]
    assert listed == [n for n in SM90_SET if expect(n)] and listed


def test_filter_applies_to_given_names_and_says_when_nothing_matches():
    names = [n for n in SM90_SET if n.startswith("fwd_")][:3]
    result = run("precompile", "--arch", "sm_90a", "--list", "--filter", "causal1", *names)
    assert [line.split()[1] for line in result.stdout.splitlines()] == [n for n in names if "causal1" in n]
    none = run("precompile", "--arch", "sm_90a", "--list", "--filter", "no_such_kernel")
    assert none.returncode == 2 and "no kernel name matches --filter no_such_kernel" in none.stderr
    assert "Traceback" not in none.stderr


def test_bad_names_fail_before_anything_is_built():
    bad = run("precompile", "--arch", "sm_90a", "--list", "bwd_bf16_d128_w4_causal1_local")
    assert bad.returncode == 2 and "is not a flashjit backward kernel name" in bad.stderr
    assert not bad.stderr.startswith("flashjit: flashjit")
    wgmma = next(n for n in SM90_SET if n.endswith("_wgmma"))
    wrong_arch = run("precompile", "--arch", "sm_80", "--list", wgmma)
    assert wrong_arch.returncode == 2 and "only for sm_90a" in wrong_arch.stderr


def test_key_inputs_without_torch_are_jits_own():
    """The CLI's cache check computes jit.key_inputs without importing torch (its versions are read
    from torch/version.py); the key must be exactly the one it gives with torch imported (the one
    jit.ensure_built uses), else --dry-run and precompile would lie."""
    pytest.importorskip("torch")
    try:
        toolkit = toolchain.find_toolkit()
    except toolchain.ToolchainError as exc:
        pytest.skip(str(exc).splitlines()[0])
    code = ("import json, sys; from flashjit import KernelConfig, __main__ as cli; "
            "c = KernelConfig(dtype='fp16', d_head=32, B_r=64, B_c=64, n_warps=4); "
            "print(json.dumps(cli.key_inputs(c, 'sm_90a'))); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    inputs, imported_torch = out.stdout.splitlines()
    assert imported_torch == "False"
    assert json.loads(inputs) == json.loads(json.dumps(jit.key_inputs(CHEAP, "sm_90a", toolkit,
                                                                      jit.build_flags("sm_90a", toolkit))))


@pytest.mark.compile
def test_precompile_progress_dry_run_and_no_torch_when_cached(private_cache):
    other = next(n for n in SM90_SET if n.startswith("bwd_"))
    cold = run("precompile", "--arch", "sm_90a", "--jobs", "2", CHEAP.name)
    assert cold.returncode == 0, cold.stderr
    assert "0 cached, 1 to compile" in cold.stdout
    assert any(line.startswith("[1/1] compiled") and line.endswith(CHEAP.name) for line in cold.stdout.splitlines())
    assert "[flashjit] compiling" not in cold.stderr  # the progress line says it once

    dry = run("precompile", "--arch", "sm_90a", "--dry-run", CHEAP.name, other)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines() == [f"cached   sm_90a  {CHEAP.name}", f"compile  sm_90a  {other}"]
    assert "1 of 2 kernels for sm_90a would be compiled, 1 are cached" in dry.stderr
    assert len(list(private_cache.rglob("kernel.so"))) == 1  # nothing built

    warm = run("precompile", "--arch", "sm_90a", CHEAP.name, python_flags=("-X", "importtime"))
    assert warm.returncode == 0, warm.stderr
    assert f"[1/1] cached      0.0 s  {CHEAP.name}" in warm.stdout
    imported = {line.split("|")[-1].strip() for line in warm.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported, "a precompile of cached kernels imported torch"

    listing = run("cache", "list")
    assert CHEAP.name in listing.stdout and "1 kernels" in listing.stdout


def test_check_runs_the_reference_backend_and_says_so():
    pytest.importorskip("torch")
    small = ["check", "--batch", "1", "--seqlen", "64", "--heads", "2", "--head-dim", "64"]
    result = run(*small, env={"FLASHJIT_BACKEND": "reference"})
    assert result.returncode == 0, result.stderr
    assert "reference backend (FLASHJIT_BACKEND=reference)" in result.stderr
    assert "PASS (reference backend)" in result.stdout and "Traceback" not in result.stderr
    hidden = run(*small, "--causal", env={"CUDA_VISIBLE_DEVICES": "", "FLASHJIT_BACKEND": ""})
    assert hidden.returncode == 0, hidden.stderr
    assert "no CUDA GPU is visible" in hidden.stderr and "PASS (reference backend)" in hidden.stdout


@pytest.mark.parametrize("script, args", [(s, ["--out", "unused"]) for s in (
    "bench_forward.py", "bench_backward.py", "bench_jit.py", "bench_decode.py", "bench_varlen.py", "profile_ncu.py")]
    + [("fwd_outputs.py", ["--save", "unused.pt"])])
def test_benchmarks_without_a_gpu_say_so_in_one_line(script, args):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / script), *args], cwd=REPO,
                            capture_output=True, text=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""),
                            timeout=120)
    assert result.returncode == 1
    assert result.stdout == "" and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"{script}: no CUDA GPU is visible")


def test_the_gpu_checks_name_what_exists():
    """scripts/mutations.py's breakages name exact text that must occur once in their files, and it and
    scripts/sanitize.py name test ids. Kernels, Python and test parameters change: four breakages and
    two sanitizer ids had gone stale unseen (the checks run only on a GPU). Every old text applies once,
    and every named test collects."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import mutations
        import sanitize
    finally:
        sys.path.remove(str(REPO / "scripts"))
    for m in mutations.MUTATIONS:
        assert (REPO / m.path).read_text().count(m.old) == 1, f"{m.name}: its old text is not in {m.path} exactly once"
    ids = sorted({t for m in mutations.MUTATIONS for t in m.selection + m.race} | set(sanitize.SELECTION))
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *ids],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def test_mutations_read_a_timed_out_run_from_its_progress_marks(tmp_path, monkeypatch):
    """A mutant that hangs a kernel is cut at the timeout with no pytest summary: mutations.pytest_run reads -q's
    progress marks from the log, so a run that failed a test before hanging is caught and one that hung with
    none failed is not."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import mutations
    finally:
        sys.path.remove(str(REPO / "scripts"))
    log = tmp_path / "run.log"
    for marks, verdict in (("..F", "failed, then hung (caught)"), ("...", "timed out, none failed (BAD)")):
        monkeypatch.setattr(mutations.sanitize, "run_logged",
                            lambda cmd, env, path, timeout, marks=marks: path.write_text(f"$ pytest\n{marks}\n") and
                            "timeout")
        rc, summary = mutations.pytest_run(["tests/x.py"], {}, None, log, 1.0)
        assert mutations.judge(rc, summary) == verdict, (marks, rc, summary)
    assert mutations.judge(1, "1 failed") == "failed (caught)" and mutations.judge(0, "3 passed") == "passed (BAD)"


def test_import_and_cli_show_no_numpy_warning():
    """torch warns ("Failed to initialize NumPy", "compiled using NumPy 1.x") when numpy does not
    match it; `import flashjit` does not import torch, and the CLI must not print such a warning."""
    for result in (subprocess.run([sys.executable, "-c", "import flashjit"], capture_output=True, text=True),
                   run("precompile", "--arch", "sm_90a", "--list", "--filter", "_d32_")):
        assert "NumPy" not in result.stderr


def test_the_readme_example_runs_without_a_gpu_and_without_warnings():
    """README's first command on a GPU-less machine: it says so, runs the reference backend, and shows no
    traceback or NumPy warning (torch prints one at import where NumPy is absent, as in a fresh venv)."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "example.py")], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "No CUDA GPU is visible" in result.stdout and "reference backend (CPU)" in result.stdout
    assert "Traceback" not in result.stderr and "NumPy" not in result.stderr, result.stderr


def test_profile_summary_ranks_stall_reasons_and_instructions():
    """scripts/profile_ncu.py's reading of ncu's raw and source pages (no ncu here: their CSV shapes):
    the stall reasons as shares of the samples, largest first, without the not-issued twins; the SASS
    lines by their share of all stall samples, thousands separators read."""
    sys.path.insert(0, str(REPO / "scripts"))
    import profile_ncu

    raw = ('"ID","Kernel Name","smsp__pcsamp_warps_issue_stalled_barrier",'
           '"smsp__pcsamp_warps_issue_stalled_barrier_not_issued","smsp__pcsamp_warps_issue_stalled_wait",'
           '"lts__t_sectors_op_red.sum","lts__t_sectors_op_read.sum"\n'
           '"","","","","","sector","sector"\n"0","k","1,500","1,400","500","4,096","8,192"\n')
    assert profile_ncu.stall_reasons(raw) == [" 75.0%  barrier", " 25.0%  wait"]
    source = ('"Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)"\n'
              '"0x10","HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ","1,000","900"\n'
              '"0x20","BAR.SYNC.DEFER_BLOCKING 0x5","3,000","2,900"\n"0x30","FFMA R1, R2, R3, R4","0","0"\n')
    summary = profile_ncu.summarize("    Duration    us    47.2\n    Other    1\n", source, 2, raw,
                                    ("lts__t_sectors_op_red.sum",))
    assert "Duration" in summary and "Other" not in summary and "75.0%  barrier" in summary
    # a metric asked for (--metric) is printed with its value; one not asked for is not
    assert "lts__t_sectors_op_red.sum: 4,096" in summary and "op_read" not in summary
    top = summary.splitlines()[-2:]
    assert top[0].startswith(" 75.0%") and "BAR.SYNC" in top[0] and top[1].startswith(" 25.0%") and "HGMMA" in top[1]


def test_ncu_compare_counts_a_blocks_instructions_and_finds_a_spinning_wait(tmp_path):
    """scripts/ncu_compare.py on two source.csv shapes (a kernel-name row, then the table): instructions per
    key block by opcode (16 HGMMA a block), a try_wait executed far more often than the loop body listed as a
    spin in the kernel that has it and in no other, stall samples ranked with offsets from the kernel's start."""
    sys.path.insert(0, str(REPO / "scripts"))
    import ncu_compare

    head = ('"Kernel Name","k"\n"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed"\n'
            '"0x7f00","HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ","100","1,600"\n'
            '"0x7f10","MUFU.EX2 R1, R1","50","6,400"\n')
    spinning = tmp_path / "a.csv"
    spinning.write_text(head + '"0x7f20","SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR17+0x10], R0","10","40,000"\n'
                               '"0x7f30","@!P0  BRA 0x7f20","300","40,000"\n')
    quiet = tmp_path / "b.csv"
    quiet.write_text(head)
    a, b = ncu_compare.load(str(spinning)), ncu_compare.load(str(quiet))
    assert [i.offset for i in a] == [0, 0x10, 0x20, 0x30] and a[3].executed == 40000
    assert ncu_compare.mix(a, 16) == {"HGMMA": 16.0, "MUFU": 64.0, "SYNCS": 400.0, "BRA": 400.0}
    assert [i.offset for i in ncu_compare.spins(a, 4.0)] == [0x20, 0x30] and ncu_compare.spins(b, 4.0) == []
    text = ncu_compare.report([str(spinning), str(quiet)], ["fj", "fa3"], 16, 4.0, 1)
    assert "fj 0.1 M (880 a key block and warp), fa3 0.0 M (80 a key block and warp)" in text
    assert "fa3: instructions run more than 4x the loop body's count: none" in text
    assert text.splitlines()[-4].strip().startswith("0x30  65.2%") and "HGMMA" in text.splitlines()[-1]


def test_sass_steps_reads_a_steps_instructions_and_its_skipped_rescale():
    """scripts/sass_steps.py (docs/perf-log.md's step counts) on cuobjdump-shaped text, no compiler: a step
    runs from a token sync through QK^T and PV wgmmas to the first unconditional or backward branch after
    its last wait; a run of 16+ multiplies a branch after that wait jumps over is the skippable rescale;
    exponentials between the two waits run under the PV; a stretch without a PV wgmma (the producer's, the
    epilogue's) is no step."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import sass_steps
    finally:
        sys.path.remove(str(REPO / "scripts"))
    lines = ["BAR.SYNC.DEFER_BLOCKING R18, 0x100", "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR16], RZ, !UPT",
             "HGMMA.64x64x16.F32.BF16 R88, R144, gdesc[UR20].tnspB, R88, gsb0", "WARPGROUP.DEPBAR.LE gsb0, 0x1",
             "FMNMX R1, R24, R25, !PT", "MUFU.EX2 R24, R24", "VOTE.ANY P0, P0", "WARPGROUP.DEPBAR.LE gsb0, 0x0",
             "@!P0 BRA 0x1f0", *[f"FMUL R{88 + i}, R{88 + i}, R153" for i in range(16)], "MUFU.EX2 R25, R25",
             "FFMA R2, R155, R2, R16", "@!P1 BRA 0x0",
             "BAR.SYNC.DEFER_BLOCKING R18, 0x100", "FADD R1, R2, R3", "WARPGROUP.DEPBAR.LE gsb0, 0x0", "EXIT"]
    sass = "\n".join(f"        /*{16 * i:04x}*/                   {text} ;  /* 0x000 */" for i, text in enumerate(lines))
    code = sass_steps.parse(sass)
    assert len(code) == len(lines) and code[8] == (0x80, "@!P0 BRA 0x1f0")
    (step,) = sass_steps.steps(code)
    assert (step.address, step.qk_n, len(step.instructions), step.skippable, step.common) == (0, 64, 28, 16, 12)
    assert step.exps_above_pv_wait == (1, 2)
    assert sass_steps.opcode("@!P0 BRA 0x1e0") == "BRA" and sass_steps.opcode("FMUL R1, R2, R3") == "FMUL"


def test_fwd_outputs_compares_saved_outputs_bit_for_bit(tmp_path):
    """scripts/fwd_outputs.py --compare (CPU): equal files pass; one differing bit or a missing entry
    fails, and the line names the entry."""
    import torch

    ones = (torch.ones(3, dtype=torch.bfloat16), torch.zeros(3))
    nudged = (torch.tensor([1.0, 1.0, 1.0078125], dtype=torch.bfloat16), torch.zeros(3))  # one ulp at 1
    for name, results in {"a": {("k", (1,)): ones, ("j", (2,)): ones}, "b": {("k", (1,)): nudged, ("j", (2,)): ones},
                          "c": {("k", (1,)): ones}}.items():
        torch.save(results, tmp_path / f"{name}.pt")

    def compare(x, y):
        return subprocess.run([sys.executable, str(REPO / "scripts" / "fwd_outputs.py"), "--compare",
                               str(tmp_path / f"{x}.pt"), str(tmp_path / f"{y}.pt")], capture_output=True, text=True,
                              timeout=120)
    same = compare("a", "a")
    assert same.returncode == 0 and "2 of 2 equal bit for bit" in same.stdout, same.stdout + same.stderr
    nudged_run = compare("a", "b")
    assert nudged_run.returncode == 1 and "differs: ('k', (1,))" in nudged_run.stdout
    assert compare("a", "c").returncode == 1


def test_ab_means_reads_passes_off_benchmark_json(tmp_path):
    """scripts/ab_means.py (CPU): each variant's figure at a point is the mean of its passes, its change is
    against the first variant's mean, a point a variant did not time says so, and with a plain (no dropout)
    JSON each variant's dropout cost is its extra time over that point."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import ab_means
    finally:
        sys.path.remove(str(REPO / "scripts"))

    def bwd(s, t, p=0.1):
        return dict(dtype="bf16", d_head=64, causal=False, seqlen=s, batch=16384 // s, heads=32, dropout_p=p,
                    flashjit_bwd_tflops=t)

    passes = {("main", 1): [bwd(1024, 300.0), bwd(4096, 360.0)], ("main", 2): [bwd(1024, 310.0), bwd(4096, 370.0)],
              ("mw", 1): [bwd(1024, 330.0)], ("mw", 2): [bwd(1024, 340.0)]}
    for (v, n), rows in passes.items():
        (tmp_path / f"bench_backward-{v}-{n}").mkdir()
        (tmp_path / f"bench_backward-{v}-{n}" / "bench_backward.json").write_text(json.dumps(dict(rows=rows)))
    (tmp_path / "plain.json").write_text(json.dumps(dict(rows=[bwd(1024, 375.0, 0.0)])))
    lines = ab_means.table(str(tmp_path), "bench_backward", ["main", "mw"], str(tmp_path / "plain.json"))
    assert len(lines) == 2
    s1k, = (line for line in lines if "S=1024" in line)
    assert "main 305.0 (300.0 / 310.0) cost +23.0%" in s1k
    assert f"mw 335.0 (330.0 / 340.0) {335 / 305 - 1:+.1%} cost {375 / 335 - 1:+.1%}" in s1k
    s4k, = (line for line in lines if "S=4096" in line)
    assert "main 365.0" in s4k and "mw not timed" in s4k and "cost" not in s4k  # no plain point at 4k
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "ab_means.py"), str(tmp_path), "--script",
                             "bench_forward", "--variants", "main"], capture_output=True, text=True)
    assert result.returncode == 1 and "no bench_forward JSON" in result.stdout
    # a varlen batch's JSON (scripts/bench_varlen.py): one dtype for the file, the batch by its sequences
    for v, n, t in (("main", 1, 300.0), ("main", 2, 310.0), ("ks", 1, 320.0)):
        (tmp_path / f"bench_varlen-{v}-{n}").mkdir()
        (tmp_path / f"bench_varlen-{v}-{n}" / "bench_varlen.json").write_text(json.dumps(dict(
            dtype="bf16", lengths=[100, 1500], rows=[dict(d_head=64, causal=False, sequences=2, flashjit=t)])))
    line, = ab_means.table(str(tmp_path), "bench_varlen", ["main", "ks"])
    assert line == f"bf16 d64 non-causal S=varlen B=2 H=None: main 305.0 (300.0 / 310.0); ks 320.0 (320.0) {320 / 305 - 1:+.1%}"


def test_targets_reads_issue_targets_off_benchmark_json(tmp_path):
    """scripts/targets.py (CPU): a target is met only where every point it speaks of has a figure at or above
    its floor; points short of it are listed worst first; a missing figure (FlexAttention not run) is not
    met; files merge, a point timed again keeping its last row; dropout's cost is its backward's extra time
    over the same point without dropout; the exit status says whether all were met."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import targets
    finally:
        sys.path.remove(str(REPO / "scripts"))

    def fwd(d, causal, s, tflops, cudnn, flex):
        return dict(dtype="bf16", d_head=d, causal=causal, seqlen=s, batch=16384 // s, heads=2048 // d,
                    tflops=tflops, cudnn_tflops=cudnn, flex_tflops=flex)

    first = [fwd(128, False, 4096, 600.0, 610.0, 450.0), fwd(64, False, 1024, 400.0, 390.0, 0.0)]
    again = [fwd(128, False, 4096, 660.0, 590.0, 450.0), fwd(256, True, 4096, 700.0, 650.0, 300.0)]
    for name, rows in (("a", first), ("b", again)):
        (tmp_path / f"{name}.json").write_text(json.dumps(dict(rows=rows)))
    rows = targets.merged([str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert len(rows) == 3 and {r["tflops"] for r in rows if r["d_head"] == 128} == {660.0}  # the last row kept
    cudnn, cudnn_long, flex, d128 = (targets.report(t, rows) for t in targets.FORWARD)
    assert cudnn[0] and not cudnn[1][1:]  # 660 / 590, 400 / 390, 700 / 650: all at or above 1.0
    assert not cudnn_long[0] and cudnn_long[1][1:] == ["    short: bf16 d256 causal S=4096 B=4 H=8: 1.08x"]
    assert not flex[0] and any("not timed" in line and "d64" in line for line in flex[1])  # flex 0: not run
    assert d128[0] and "660" in d128[1][0]
    bwd = [dict(dtype="fp16", d_head=64, causal=False, seqlen=4096, batch=4, heads=32, dropout_p=p,
                flashjit_bwd_tflops=t, cudnn_bwd_tflops=400.0, fa2_bwd_tflops=300.0) for p, t in ((0.0, 440.0), (0.1, 390.0))]
    (tmp_path / "bwd.json").write_text(json.dumps(dict(rows=bwd)))
    (row, cost), = targets.dropout_costs(targets.merged([str(tmp_path / "bwd.json")]))
    assert row["dropout_p"] == 0.1 and abs(cost - (440 / 390 - 1)) < 1e-12
    met, lines = targets.dropout_report(targets.merged([str(tmp_path / "bwd.json")]))
    assert not met and "+12.8%" in lines[1]
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "targets.py"), "--backward", str(tmp_path / "bwd.json")],
                            capture_output=True, text=True)
    assert result.returncode == 1 and result.stdout.splitlines()[0].startswith("met: backward >= 1.0x cuDNN")
