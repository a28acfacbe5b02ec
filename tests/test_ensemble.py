"""The checkpoint ensemble: the kernel averaged over warm-up checkpoints equals the mean of the
plain-autograd kernels at those adapters, the replayed warm-up is the context's own, the shared
model keeps its adapter, and the method runs through `select` and `--dry-run`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import naive_gradients
from ntkselect.selection.ntk_variants.ensemble import adapter_state, checkpoint_steps, swapped_adapter

torch.set_num_threads(1)


def test_checkpoint_steps_are_evenly_spaced_and_end_at_the_last_step():
    assert checkpoint_steps(10, 3) == [3, 7, 10]
    assert checkpoint_steps(4, 3) == [1, 3, 4]
    assert checkpoint_steps(1, 3) == [1]  # fewer steps than checkpoints: each step once
    assert checkpoint_steps(5, 1) == [5] and checkpoint_steps(0, 3) == []


def test_ensemble_scores_are_the_mean_autograd_kernel_over_the_checkpoints(tiny_model_dir, examples, tokenizer):
    from ntkselect.config import SelectConfig
    from ntkselect.data.records import Record
    from ntkselect.model.loading import load_model
    from ntkselect.model.runtime import Runtime
    from ntkselect.selection import SelectionContext, get_selector
    from ntkselect.training.warmup import add_lora, warmup

    recs = [Record(id=str(i), raw={"text": str(i)}, path="m.jsonl", line=i + 1) for i in range(len(examples))]
    dom, pool = slice(0, 4), slice(4, None)
    cfg = SelectConfig(
        domain="-", pool="-", n=2, out="-", model=tiny_model_dir, method="ntk-ensemble", checkpoints=3, warmup_epochs=2, warmup_batch_size=2,
        warmup_lr=5e-3, preselect_factor=2.0, knn_k=2, precision="float32",
    )  # fmt: skip
    rt = Runtime(pad_id=tokenizer.pad_token_id, progress=False, dtype=torch.float32, batch_size=3)
    ctx = SelectionContext(cfg, recs[dom], recs[pool], examples[dom], examples[pool], rt, log=lambda *_: None)
    r = get_selector("ntk-ensemble").rank(ctx, 2)
    assert r.info["stage2"]["checkpoints"]["steps"] == [1, 3, 4] and r.info["stage2"]["checkpoints"]["replayed_steps"] == 3

    # the reference: the same warm-up on a fresh model, its adapter kept at steps 1, 3 and 4
    ref_model = add_lora(load_model(tiny_model_dir), ctx.lora_options())
    states = {}
    warmup(ref_model, examples[dom], ctx.lora_options(), rt, on_step=lambda s, _t: states.__setitem__(s, adapter_state(ref_model)))
    final = adapter_state(ctx.model())
    for k, v in states[4].items():  # the replay is the context's own warm-up, and its adapter was restored after scoring
        torch.testing.assert_close(final[k], v)
    assert any(not torch.equal(states[1][k], v) for k, v in states[4].items())  # the checkpoints differ
    ref_model.eval()
    cand = [examples[pool][int(i)] for i in r.order]
    s, q = np.zeros(len(cand)), np.zeros(len(cand))
    for step in (1, 3, 4):
        with swapped_adapter(ref_model, states[step]):
            gd = naive_gradients(ref_model, examples[dom], tokenizer.pad_token_id).double()
            gc = naive_gradients(ref_model, cand, tokenizer.pad_token_id).double()
        s += (gc @ gd.T).mean(1).numpy() / 3
        last = (gc @ gd.T).mean(1).numpy()
        q += (gc**2).sum(1).numpy() / 3
    np.testing.assert_allclose(r.columns["kernel_score"], s, rtol=1e-4, atol=1e-4 * np.abs(s).max())
    np.testing.assert_allclose(r.columns["grad_norm"], np.sqrt(q), rtol=1e-4)
    assert not np.allclose(s, last, rtol=1e-2)  # the final adapter alone would give other scores
    assert list(r.scores) == sorted(r.scores, reverse=True)


def _args(data, model, out, *extra):
    dom, pool, _ = data
    args = ["select", "--domain", dom, "--pool", pool, "--n", 4, "--out", out, "--model", model, "--method", "ntk-ensemble", "--knn-k", 2]
    args += ["--precision", "float32", "--warmup-batch-size", 2, "--checkpoints", 3, *extra]
    return [str(a) for a in args]


def test_the_ensemble_through_select_and_the_dry_run(data, tiny_model_dir, tmp_path):
    from ntkselect.cli.main import build_parser, config_from_args, main
    from ntkselect.runs.plan import estimate

    out = tmp_path / "run"
    assert main(_args(data, tiny_model_dir, out)) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["selector"]["variant"]["checkpoints"] == 3 and man["selector"]["stage2"]["checkpoints"]["steps"] == [1, 3, 4]
    plan = estimate(config_from_args(build_parser().parse_args(_args(data, tiny_model_dir, tmp_path / "dry", "--dry-run"))))
    stages = {s["stage"]: s for s in plan["stages"]}
    assert stages["warm-up replay"]["tokens"] == pytest.approx(0.75 * stages["warm-up"]["tokens"], abs=1)  # to step 3 of 4
    ntk = estimate(config_from_args(build_parser().parse_args(_args(data, tiny_model_dir, tmp_path / "dry", "--dry-run", "--method", "ntk"))))
    base = next(s for s in ntk["stages"] if s["stage"] == "stage 2")
    assert stages["stage 2"]["tokens"] == pytest.approx(3 * base["tokens"], abs=3)


def test_bad_checkpoints_are_refused_naming_the_flag(data, tiny_model_dir, tmp_path, capsys):
    from ntkselect.cli.main import main

    assert main(_args(data, tiny_model_dir, tmp_path / "run", "--checkpoints", "0")) == 2
    assert capsys.readouterr().err == "ntkselect: error: --checkpoints: must be an integer from 1 to 64 (got 0)\n"


def test_evaluate_runs_the_ensemble_on_the_shared_context_and_leaves_its_adapter(tiny_model_dir, tmp_path):
    """In `evaluate` every method shares one warmed-up model per seed: the ensemble swaps its
    checkpoints in and out, so ntk after it selects exactly what ntk alone does."""
    from helpers import write_eval_data
    from ntkselect.cli.main import main

    p = write_eval_data(tmp_path)

    def evaluate(out, methods):
        args = ["evaluate", "--domain-train", p["train"], "--domain-test", p["test"], "--pool", p["pool"], "--n", 3, "--out", out]
        args += ["--model", tiny_model_dir, "--seeds", 1, "--methods", methods, "--knn-k", 2, "--warmup-epochs", 3, "--checkpoints", 3]
        args += ["--ft-epochs", 1, "--ft-batch-size", 4, "--batch-size", 4, "--max-batch-tokens", 512, "--precision", "float32"]
        assert main([str(a) for a in args]) == 0
        return {m: (out / "selections" / f"{m}-seed0" / "selected.jsonl").read_text() for m in methods.split(",")}

    both = evaluate(tmp_path / "both", "ntk-ensemble,ntk")
    alone = evaluate(tmp_path / "alone", "ntk")
    assert both["ntk"] == alone["ntk"]
    man = json.loads((tmp_path / "both" / "selections" / "ntk-ensemble-seed0" / "manifest.json").read_text())
    assert man["selector"]["stage2"]["checkpoints"]["steps"] == [1, 2, 3]
    assert "| ntk-ensemble |" in (tmp_path / "both" / "results.md").read_text()
