"""flashjit.install_flash_attn_alias and `python -m flashjit run`: code written for flash-attn runs
unchanged on flashjit (CPU, FLASHJIT_BACKEND=reference), and a real flash-attn is never shadowed."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import flashjit
from flashjit import alias

REPO = Path(__file__).resolve().parents[1]

# Written against flash-attn's API only: nothing in it knows about flashjit.
FLASH_ATTN_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    import flash_attn
    from flash_attn import flash_attn_func
    from flash_attn.bert_padding import pad_input, unpad_input
    from flash_attn.flash_attn_interface import flash_attn_qkvpacked_func

    torch.manual_seed(0)
    batch, seqlen, heads, head_dim = 2, 9, 2, 16
    qkv = torch.randn(batch, seqlen, 3, heads, head_dim, requires_grad=True)
    out = flash_attn_qkvpacked_func(qkv, causal=True)
    q, k, v = qkv.unbind(2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / head_dim ** 0.5
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool).tril()
    expected = torch.einsum("bhqk,bkhd->bqhd", scores.masked_fill(~causal, float("-inf")).softmax(-1), v)
    out.sum().backward()
    mask = torch.arange(seqlen)[None, :] < torch.tensor([[9], [4]])
    packed, indices, cu_seqlens, max_seqlen, seqused = unpad_input(out, mask)
    repadded = pad_input(packed, indices, batch, seqlen)
    print(json.dumps({
        "name": __name__, "argv": sys.argv[1:], "version": flash_attn.__version__,
        "max_err": (out - expected).abs().max().item(),
        "same_as_func": torch.equal(out, flash_attn_func(q, k, v, causal=True)),
        "grad_finite": bool(torch.isfinite(qkv.grad).all()),
        "cu_seqlens": cu_seqlens.tolist(), "max_seqlen": max_seqlen, "seqused": seqused.tolist(),
        "repadded_ok": torch.equal(repadded[mask], out[mask]) and not repadded[~mask].any(),
    }))
""")


def run_flashjit(*args, pythonpath=None):
    env = dict(os.environ, FLASHJIT_BACKEND="reference")
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "flashjit", *args], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.fixture
def fake_real_flash_attn(tmp_path):
    """A directory holding a package named flash_attn, as an installed flash-attn would be."""
    site = tmp_path / "site"
    (site / "flash_attn").mkdir(parents=True)
    (site / "flash_attn" / "__init__.py").write_text("__version__ = '2.8.3'\nREAL = True\n")
    return site


@pytest.fixture
def clean_modules(monkeypatch):
    """The test's sys.modules and sys.path changes are undone (no alias leaks into other tests)."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    saved = {name: mod for name, mod in sys.modules.items() if name.split(".")[0] == "flash_attn"}
    yield
    for name in [n for n in sys.modules if n.split(".")[0] == "flash_attn"]:
        del sys.modules[name]
    sys.modules.update(saved)


def test_a_flash_attn_script_runs_unchanged_through_flashjit_run(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(FLASH_ATTN_SCRIPT)
    result = run_flashjit("run", str(script), "--epochs", "3", "-v")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["name"] == "__main__" and report["argv"] == ["--epochs", "3", "-v"]
    assert report["version"] == alias.VERSION and "+flashjit." in report["version"]
    assert report["max_err"] < 1e-5 and report["same_as_func"] and report["grad_finite"]
    assert report["cu_seqlens"] == [0, 9, 13] and report["max_seqlen"] == 9 and report["seqused"] == [9, 4]
    assert report["repadded_ok"]


def test_run_passes_the_scripts_exit_status_and_traceback(tmp_path):
    script = tmp_path / "fails.py"
    script.write_text("import sys\nif sys.argv[1:] == ['exit']:\n    sys.exit(3)\nraise ValueError('boom in the script')\n")
    assert run_flashjit("run", str(script), "exit").returncode == 3
    result = run_flashjit("run", str(script))
    assert result.returncode == 1 and "Traceback" in result.stderr and "ValueError: boom in the script" in result.stderr
    missing = run_flashjit("run", str(tmp_path / "nope.py"))
    assert missing.returncode == 2 and "no such file" in missing.stderr


def test_run_refuses_when_a_real_flash_attn_is_installed(tmp_path, fake_real_flash_attn):
    script = tmp_path / "train.py"
    script.write_text("print('the script ran')\n")
    result = run_flashjit("run", str(script), pythonpath=fake_real_flash_attn)
    assert result.returncode == 1 and "the script ran" not in result.stdout
    assert "real flash-attn is installed" in result.stderr and str(fake_real_flash_attn) in result.stderr


def test_install_refuses_to_shadow_a_real_flash_attn(clean_modules, fake_real_flash_attn):
    sys.path.insert(0, str(fake_real_flash_attn))
    with pytest.raises(RuntimeError, match="never shadows"):
        flashjit.install_flash_attn_alias()
    assert "flash_attn" not in sys.modules
    import flash_attn  # the real one still imports
    assert flash_attn.REAL
    with pytest.raises(RuntimeError, match="already imported"):
        flashjit.install_flash_attn_alias()


def test_install_is_idempotent_and_the_modules_answer_like_packages(clean_modules):
    module = flashjit.install_flash_attn_alias()
    assert flashjit.install_flash_attn_alias() is module
    import flash_attn.bert_padding
    import flash_attn.flash_attn_interface

    assert flash_attn is module and flash_attn.__version__ == alias.VERSION
    assert flash_attn.flash_attn_func is flashjit.flash_attn_func
    assert flash_attn.flash_attn_interface.flash_attn_kvpacked_func is flashjit.flash_attn_kvpacked_func
    assert flash_attn.bert_padding.unpad_input is flashjit.unpad_input
    from flash_attn.bert_padding import index_first_axis_residual, unpad_input_for_concatenated_sequences  # noqa: F401
    assert importlib.util.find_spec("flash_attn") is not None  # availability checks see it
    assert "flash_attn_qkvpacked_func" in dir(flash_attn)
    with pytest.raises(ModuleNotFoundError):
        import flash_attn.layers.rotary  # noqa: F401  (not provided: a plain import error)


def test_functions_flashjit_adds_later_appear_under_the_alias(clean_modules, monkeypatch):
    from flashjit import flash_api

    name = "flash_attn_with_kvcache"
    flashjit.install_flash_attn_alias()
    import flash_attn

    if getattr(flashjit, name, None) is None and getattr(flash_api, name, None) is None:
        with pytest.raises(AttributeError, match="does not provide it yet"):
            getattr(flash_attn, name)
        monkeypatch.setattr(flash_api, name, lambda *a, **k: "kvcache", raising=False)
        assert flash_attn.flash_attn_interface.flash_attn_with_kvcache() == "kvcache"
    else:
        assert getattr(flash_attn, name) is (getattr(flashjit, name, None) or getattr(flash_api, name))
    with pytest.raises(AttributeError):
        flash_attn.not_a_flash_attn_name
