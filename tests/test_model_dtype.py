"""--model-dtype, weights straight onto the device, random:<config> models, the merged LoRA
weights, the dtype-aware preflight and the GPU check script's CPU smoke mode (issue 21)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import synthetic_examples, tiny_lora_model
from ntkselect.cli.main import main


def _error(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if "%|" not in ln and ln.strip()]
    assert len(err) == 1 and err[0].startswith("ntkselect: error:"), err
    return err[0]


def _select(data, model, out, *extra):
    dom, pool, _ = data
    common = ["--n", 4, "--out", str(out), "--model", model, "--threads", 1, "--knn-k", 4, "--warmup-epochs", 1]
    return ["select", "--domain", dom, "--pool", pool, *common, *extra]


@pytest.mark.parametrize("cmd", ["select", "evaluate", "diagnose"])
def test_bad_model_dtype_is_one_line_naming_the_flag(cmd, data, tiny_model_dir, tmp_path, capsys):
    dom, pool, _ = data
    args = {
        "select": _select(data, tiny_model_dir, tmp_path / "o"),
        "evaluate": ["evaluate", "--domain-train", dom, "--pool", pool, "--test", dom, "--n", 2, "--out", str(tmp_path / "e"), "--model", tiny_model_dir],
        "diagnose": ["diagnose", "--domain", dom, "--pool", pool, "--out", str(tmp_path / "d"), "--model", tiny_model_dir],
    }[cmd]
    with pytest.raises(SystemExit) as exit_:  # argparse's choices: one line, exit status 2
        main([str(a) for a in args] + ["--model-dtype", "int8"])
    assert exit_.value.code == 2
    assert "--model-dtype" in _error(capsys)
    assert not (tmp_path / "o").exists() and not (tmp_path / "e").exists() and not (tmp_path / "d").exists()


def test_auto_model_dtype_is_float32_on_a_cpu_and_explicit_wins(tiny_model_dir):
    from ntkselect.model.loading import load_model, resolve_model_dtype

    cpu = torch.device("cpu")
    assert resolve_model_dtype("auto", cpu, tiny_model_dir) == torch.float32
    assert resolve_model_dtype("bfloat16", cpu, tiny_model_dir) == torch.bfloat16
    m = load_model(tiny_model_dir, torch.bfloat16, cpu)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in m.parameters())


def test_shipped_random_configs_have_the_papers_shapes():
    """Llama-3-8B with LoRA r = 8 on all linear layers: 8.03B weights and D = 20,971,520 (the
    issue's ~21M), read on the meta device: nothing allocated."""
    from ntkselect.model.loading import check_model_options, meta_model, random_configs

    assert {"smollm2-135m", "llama-3-8b", "qwen3-8b"} <= set(random_configs())
    llama = meta_model("random:llama-3-8b")
    assert abs(sum(p.numel() for p in llama.parameters()) - 8.03e9) < 0.01e9
    assert check_model_options("random:llama-3-8b", "all-linear", 8) == 20_971_520
    qwen = meta_model("random:qwen3-8b")
    assert abs(sum(p.numel() for p in qwen.parameters()) - 8.19e9) < 0.01e9
    smol = meta_model("random:smollm2-135m")
    assert abs(sum(p.numel() for p in smol.parameters()) - 134.5e6) < 1e6


def test_random_model_is_seeded_and_leaves_the_global_rng_alone(tmp_path):
    from ntkselect.model.loading import load_model

    cfg = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 128}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = load_model(f"random:{tmp_path / 'config.json'}")
    assert torch.equal(torch.random.get_rng_state(), before)
    b = load_model(f"random:{tmp_path}", torch.float32, "cpu")
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_unknown_random_config_and_quantised_checkpoint_are_one_line(data, tiny_model_dir, tmp_path, capsys):
    assert main([str(a) for a in _select(data, "random:no-such-shape", tmp_path / "o")]) == 2
    assert "random:no-such-shape" in _error(capsys)
    q = tmp_path / "quantised"
    q.mkdir()
    for f in Path(tiny_model_dir).iterdir():
        (q / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((q / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (q / "config.json").write_text(json.dumps(cfg))
    from ntkselect.errors import NtkSelectError
    from ntkselect.model.loading import load_model

    with pytest.raises(NtkSelectError, match="quantised \\(bitsandbytes\\)"):
        load_model(str(q))


def test_preflight_accepts_bfloat16_weights_and_still_catches_a_wrong_gradient(monkeypatch):
    """Half-precision weights get a tolerance that fits their rounding; a structural error is
    still O(1) above it."""
    from ntkselect.errors import NtkSelectError
    from ntkselect.model.runtime import Runtime
    from ntkselect.runs import preflight

    model = tiny_lora_model("llama")
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    rt = Runtime(dtype=torch.bfloat16, model_dtype=torch.bfloat16, progress=False)
    ex = synthetic_examples(4)
    assert preflight.tolerances(model)[0] > preflight._GRAD_TOL[torch.float32]
    preflight.check_model(model, rt, ex, ("embed", "ntk"), measure=False)
    from ntkselect.grads import fused

    real = fused.FusedLoraGradients._reduce

    def wrong(self, k, x, g, mode, vec=None, right=None):  # a LoRA scale applied twice: a structural error
        out = real(self, k, x, g, mode, vec, right)
        return {n: t * 0.5 for n, t in out.items()} if isinstance(out, dict) else out

    monkeypatch.setattr(fused.FusedLoraGradients, "_reduce", wrong)
    with pytest.raises(NtkSelectError, match="differ from autograd"):
        preflight.check_model(model, rt, ex, ("embed", "ntk"), measure=False)


def test_lora_factors_are_merged_once_per_stage_not_per_batch(monkeypatch):
    """Stage 2 over many batches builds each layer's W + sBA once (and the scores are those of a
    merge per batch)."""
    from ntkselect.grads import fused
    from ntkselect.model.runtime import Runtime
    from ntkselect.selection.ntk.stage1 import embed
    from ntkselect.selection.ntk.stage2 import domain_mean_gradient, score_against

    model = tiny_lora_model("llama")
    layers = len(fused.FusedLoraGradients(model).layers)
    ex = synthetic_examples(8)
    rt = Runtime(batch_size=1, progress=False)
    calls = []
    real = fused.merged_weight
    monkeypatch.setattr(fused, "merged_weight", lambda *a, **k: calls.append(1) or real(*a, **k))
    vec = domain_mean_gradient(model, ex[:2], rt)
    calls.clear()
    once = score_against(model, ex, vec, rt)  # 8 batches of one
    assert len(calls) == layers
    calls.clear()
    embed(model, ex, rt)
    assert len(calls) == layers
    per_batch = np.concatenate([score_against(model, [e], vec, rt) for e in ex])
    assert np.array_equal(once, per_batch)


def test_select_in_bfloat16_weights_ranks_like_float32(data, tiny_model_dir, tmp_path):
    """A whole selection with --model-dtype bfloat16 (float32 matmuls otherwise) against float32:
    the scores of the candidates both score are close and in nearly the same order."""

    def scores(out, dtype):
        assert main([str(a) for a in _select(data, tiny_model_dir, out, "--model-dtype", dtype, "--precision", "float32")]) == 0
        rows = [json.loads(ln) for ln in (out / "scores.jsonl").read_text().splitlines()]
        manifest = json.loads((out / "manifest.json").read_text())
        return {r["id"]: r["score"] for r in rows}, manifest

    s32, m32 = scores(tmp_path / "f32", "float32")
    s16, m16 = scores(tmp_path / "bf16", "bfloat16")
    assert m16["config"]["model_dtype"] == "bfloat16" and m32["config"]["model_dtype"] == "float32"
    common = sorted(set(s32) & set(s16))
    a, b = np.array([s32[i] for i in common]), np.array([s16[i] for i in common])
    assert len(common) >= 4
    assert np.corrcoef(a, b)[0, 1] > 0.95


def test_device_check_smoke_mode_runs_every_phase(tmp_path):
    """benchmarks/device_check.py on a CPU with a tiny model: exactness of float32 to float
    rounding, bfloat16 within a few percent, every phase timed, the JSON written."""
    import importlib.util

    path = Path(__file__).parents[1] / "benchmarks" / "device_check.py"
    spec = importlib.util.spec_from_file_location("device_check", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["device_check"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    out = tmp_path / "dc.json"
    assert mod.main(["--smoke", "--out", str(out)]) == 0
    res = json.loads(out.read_text())["shapes"]["smoke"]
    assert res["exactness"]["float32"]["relative_error"] < 1e-5
    assert res["exactness"]["float32"]["spearman"] == 1.0
    assert res["exactness"]["bfloat16"]["relative_error"] < 0.05
    assert set(res["speed"]["rows"]) == {"forward", "stage1", "domain", "exact", "projected", "projected_cached"}
    assert all("seconds" in r for r in res["speed"]["rows"].values())
    assert {"stage1_throughput_vs_forward", "exact_time_vs_forward", "projected_time_vs_forward", "projected_cached_time_vs_forward"} <= set(
        res["speed"]["ratios"]
    )
