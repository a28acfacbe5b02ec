"""End to end on the tiny model: the CLI, its outputs, determinism and user-facing errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import CLI_TOPICS
from ntkselect.cli.main import main


def run(args):
    return main([str(a) for a in args])


def args_for(data, model, out, *extra):
    dom, pool, _ = data
    return [
        "select",
        "--domain",
        dom,
        "--pool",
        pool,
        "--n",
        5,
        "--out",
        out,
        "--model",
        model,
        "--proj-dim",
        256,
        "--knn-k",
        3,
        "--warmup-epochs",
        1,
        "--precision",
        "float32",
        *extra,
    ]


def test_select_writes_every_output(data, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(args_for(data, tiny_model_dir, out)) == 0
    printed = capsys.readouterr().out
    assert "selected 5 of 25" in printed and "time per stage" in printed
    _, _, pool = data
    by_id = {r.get("id", str(i)): r for i, r in enumerate(pool)}

    selected = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]
    assert [r["selection_rank"] for r in selected] == [1, 2, 3, 4, 5]
    assert [r["selection_score"] for r in selected] == sorted((r["selection_score"] for r in selected), reverse=True)
    assert {r["selection_method"] for r in selected} == {"ntk"}
    for r in selected:  # the user's record unchanged, plus the three fields
        rid = r.get("id") or str(pool.index({k: v for k, v in r.items() if not k.startswith("selection_")}))
        assert {k: v for k, v in r.items() if not k.startswith("selection_")} == by_id[rid]

    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 20  # M = 4 N candidates reached stage 2
    assert sum(s["selected"] for s in scores) == 5
    assert all(set(s) == {"id", "votes", "score", "rank", "selected"} for s in scores)
    assert min(s["score"] for s in scores if s["selected"]) >= max(s["score"] for s in scores if not s["selected"])

    train = (out / "train.jsonl").read_text().splitlines()
    assert len(train) == len(CLI_TOPICS) + 5

    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] and m["seed"] == 0 and m["config"]["n"] == 5
    assert len(m["inputs"]["domain"]["sha256"]) == 64 and len(m["inputs"]["pool"]["sha256"]) == 64
    assert {"torch", "transformers", "peft"} <= set(m["versions"])
    assert {"warmup", "stage1", "stage2", "total"} <= set(m["timings"])
    assert m["token_convention"]["template"] == "chat"

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out / "adapter"))
    assert any("lora_A" in n for n, _ in peft_model.named_parameters())


def test_same_seed_same_outputs_other_seed_differs(data, tiny_model_dir, tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert run(args_for(data, tiny_model_dir, tmp_path / name, "--seed", seed, "--batch-size", 4 if name == "b" else 16)) == 0
    read = lambda name, f: (tmp_path / name / f).read_text()
    sel = lambda name: [json.loads(line)["selection_rank"] for line in read(name, "selected.jsonl").splitlines()]
    ids = lambda name: [json.loads(line).get("id") for line in read(name, "selected.jsonl").splitlines()]
    assert ids("a") == ids("b") and sel("a") == sel("b")  # batch size does not change the selection
    sa = [json.loads(line)["score"] for line in read("a", "scores.jsonl").splitlines()]
    sb = [json.loads(line)["score"] for line in read("b", "scores.jsonl").splitlines()]
    assert sa == pytest.approx(sb, rel=1e-5)
    assert read("a", "scores.jsonl") != read("c", "scores.jsonl")


def test_rerun_into_a_finished_run_refuses_without_overwrite(data, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(args_for(data, tiny_model_dir, out, "--warmup-epochs", 0)) == 0
    capsys.readouterr()
    assert run(args_for(data, tiny_model_dir, out, "--warmup-epochs", 0)) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert run(args_for(data, tiny_model_dir, out, "--warmup-epochs", 0, "--overwrite")) == 0


@pytest.mark.parametrize(
    "problem,expect",
    [
        ("bad-json", "line 2"),
        ("n-too-large", "larger than the pool"),
        ("n-zero", "--n"),
        ("no-model", "--model"),
    ],
)
def test_bad_input_is_one_line_without_traceback(data, tiny_model_dir, tmp_path, problem, expect):
    dom, pool, _ = data
    args = args_for(data, tiny_model_dir, tmp_path / "run")
    if problem == "bad-json":
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"text": "fine"}\n{"text": broken\n')
        args[args.index(pool)] = bad
    elif problem == "n-too-large":
        args[args.index("--n") + 1] = 1000
    elif problem == "n-zero":
        args[args.index("--n") + 1] = 0
    else:
        args[args.index("--model") + 1] = tmp_path / "no-such-model"
    proc = subprocess.run([sys.executable, "-m", "ntkselect", *map(str, args)], capture_output=True, text=True)
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if line.startswith("ntkselect: error:")]
    assert len(err) == 1 and expect in err[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "manifest.json").exists()
    assert not (tmp_path / "run" / "selected.jsonl").exists()


@pytest.mark.parametrize("fmt", ["csv", "parquet", "hf", "json"])
def test_select_reads_every_input_format(data, tiny_model_dir, tmp_path, fmt):
    import pandas as pd

    _, pool_path, pool = data
    rows = [{"prompt": r.get("prompt", r.get("text")), "response": r.get("response", "ok"), "source": r.get("source", "text")} for r in pool]
    if fmt == "csv":
        p = tmp_path / "pool.csv"
        pd.DataFrame(rows).to_csv(p, index=False)
    elif fmt == "parquet":
        p = tmp_path / "pool.parquet"
        pd.DataFrame(rows).to_parquet(p)
    elif fmt == "json":
        p = tmp_path / "pool.json"
        p.write_text(json.dumps(rows))
    else:
        import datasets

        p = tmp_path / "pool_hf"
        datasets.Dataset.from_list(rows).save_to_disk(str(p))
    args = args_for(data, tiny_model_dir, tmp_path / "run", "--warmup-epochs", 0)
    args[args.index(pool_path)] = p
    assert run(args) == 0
    ids = [json.loads(line)["id"] for line in (tmp_path / "run" / "scores.jsonl").read_text().splitlines()]
    assert all(i.isdigit() and int(i) < len(rows) for i in ids)  # no id field: the row number


def test_unfinished_run_is_cleared_not_trusted(data, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(args_for(data, tiny_model_dir, out, "--warmup-epochs", 0)) == 0
    for f in ("manifest.json", "run.json"):
        (out / f).unlink()
    (out / "selected.jsonl").write_text('{"half": "written"}\n')  # a crash of ntkselect's own run left this, no manifest
    capsys.readouterr()
    assert run(args_for(data, tiny_model_dir, out, "--warmup-epochs", 0)) == 0
    assert "unfinished run" in capsys.readouterr().out
    assert len((out / "selected.jsonl").read_text().splitlines()) == 5


def test_demo_command_runs_on_the_tiny_model(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    assert (
        main(
            [
                "demo",
                "--model",
                tiny_model_dir,
                "--domain-size",
                "8",
                "--pool-mmlu",
                "24",
                "--pool-reasoning",
                "4",
                "--n",
                "4",
                "--out",
                str(out),
                "--warmup-epochs",
                "0",
                "--knn-k",
                "4",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "selected 4 of 28" in printed and "selected by source" in printed
    m = json.loads((out / "manifest.json").read_text())
    assert m["summary"]["by_source"].keys() == {"mmlu", "reasoning_gym"}
    domain = [json.loads(line) for line in (out / "data" / "domain.jsonl").read_text().splitlines()]
    assert len(domain) == 8 and all(
        r["subject"] in ("anatomy", "clinical_knowledge", "college_medicine", "medical_genetics", "professional_medicine") for r in domain
    )
