"""Everything that can be validated is validated before the long work starts (issue 14).

Hostile inputs through the real CLI: malformed strings and ids in the data, float flags that are
nan / inf / huge, TOML values of the wrong type, devices that do not exist, LoRA targets the
model does not have. Each ends with exit 2, one ``ntkselect: error:`` line naming the file or
flag, no traceback, and nothing written (--out not even created)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ntkselect.cli.main import main

DOMAIN = [
    {"id": f"d{i}", "question": f"What should a doctor know about {t}?", "answer": f"Facts about {t} matter in the clinic."}
    for i, t in enumerate(["blood pressure", "the kidney", "a fracture", "insulin"])
]
POOL = [
    {"id": f"p{i}", "prompt": f"Question {i}: tell me about {w}.", "response": f"{w.capitalize()} is topic {i}."}
    for i, w in enumerate(["algebra", "a contract", "primes", "torts", "integrals", "fever", "vectors", "asthma"])
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("val")
    out = {}
    test = [
        {"id": f"t{i}", "question": f"Is {w} a topic of medicine and of the clinic today?", "options": ["yes", "no"], "answer": "yes"}
        for i, w in enumerate(["fever", "asthma", "gout"])
    ]
    for name, rows in (("domain", DOMAIN), ("pool", POOL), ("test", test)):
        out[name] = d / f"{name}.jsonl"
        out[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def sel(files, model, out, *extra, pool=None):
    return [
        "select",
        "--domain",
        str(files["domain"]),
        "--pool",
        str(pool or files["pool"]),
        "--n",
        "2",
        "--out",
        str(out),
        "--model",
        str(model),
        "--warmup-epochs",
        "0",
        "--precision",
        "float32",
        "--knn-k",
        "2",
        "--threads",
        "1",
        *map(str, extra),
    ]


def refused(rc: int, err: str, out: Path | None, *expect: str) -> str:
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("ntkselect: error: "), err
    for s in expect:
        assert s in lines[0], (s, lines[0])
    if out is not None:
        assert not out.exists(), sorted(p.name for p in out.iterdir())  # nothing written
    return lines[0]


# --------------------------------------------------------------------------- select flags

FLAGS = [
    (("--lora-alpha", "nan"), "--lora-alpha: must be a finite number"),
    (("--lora-alpha", "inf"), "--lora-alpha: must be a finite number"),
    (("--warmup-lr", "nan"), "--warmup-lr: must be a finite number"),
    (("--warmup-epochs", "inf"), "--warmup-epochs: must be a finite number"),
    (("--warmup-epochs", "1e999"), "--warmup-epochs: must be a finite number"),
    (("--preselect-factor", "nan"), "--preselect-factor: must be a finite number"),
    (("--lora-dropout=-inf",), "--lora-dropout: must be a finite number"),
    (("--seed", str(2**64)), "--seed: must be at most"),
    (("--n", "9" * 30), "--n: must be at most"),
    (("--threads", "100000"), "--threads: must be at most the number of CPUs"),
    (("--proj-dim", "80000000000"), "--proj-dim: must be at most 16777216"),
    (("--less-proj-dim", "80000000000"), "--less-proj-dim: must be at most"),
    (("--device", "foo"), "--device 'foo': not a device"),
    (("--device", "meta"), "use cpu, cuda, cuda:N or auto"),
    (("--device", "cuda:99"), "--device cuda:99"),
    (("--lora-target-modules", "q_prj"), "'q_prj' names no module of this model"),
    (("--lora-target-modules", "lm_head"), "'lm_head' is the LM head"),
    (("--lora-target-modules", "embed_tokens"), "'embed_tokens' is not a linear layer"),
    (("--lora-target-modules", ","), "--lora-target-modules: must name modules"),
    (("--lora-r", "100000"), "--lora-r: must be at most the model's hidden size (32)"),
    (("--method", "less"), "--method less needs --warmup-epochs > 0"),
    (("--n", "abc"), "argument --n: invalid int value: 'abc'"),
    (("--method", "magic"), "argument --method: invalid choice"),
]


@pytest.mark.parametrize("flag, expect", FLAGS, ids=[" ".join(f) for f, _ in FLAGS])
def test_a_bad_select_flag_is_one_line_and_writes_nothing(flag, expect, files, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    try:
        rc = main(sel(files, tiny_model_dir, out, *flag))
    except SystemExit as e:  # argparse's own errors exit from parse_args
        rc = e.code
    line = refused(rc, capsys.readouterr().err, out, expect)
    assert flag[0].split("=")[0] in line


def test_flag_errors_have_no_traceback_in_a_subprocess(files, tiny_model_dir, tmp_path):
    for flag in (("--warmup-lr", "nan"), ("--device", "cuda:3"), ("--n", "x")):
        out = tmp_path / "run"
        proc = subprocess.run([sys.executable, "-m", "ntkselect", *sel(files, tiny_model_dir, out, *flag)], capture_output=True, text=True, timeout=300)
        refused(proc.returncode, proc.stderr, out, flag[0])


def test_the_python_api_checks_types_too():
    from ntkselect.config import SelectConfig
    from ntkselect.errors import NtkSelectError

    base = dict(domain="d.jsonl", pool="p.jsonl", n=2, out="o")
    for bad, expect in (
        (dict(n=True), "--n: must be an integer"),
        (dict(n=2.0), "--n: must be an integer"),
        (dict(overwrite="false"), "--overwrite: must be true or false"),
        (dict(lora_alpha="16"), "--lora-alpha: must be a number"),
        (dict(warmup_lr=float("nan")), "finite"),
        (dict(model=3), "--model: must be a string"),
    ):
        with pytest.raises(NtkSelectError, match=expect):
            SelectConfig(**{**base, **bad}).validate()


# --------------------------------------------------------------------------- strings and values in the data

BAD_DATA = [
    ('{"id": "p", "text": "a lone \\ud800 surrogate"}', "field 'text' holds a lone surrogate"),
    ('{"id": "\\udc00", "text": "fine text here"}', "field 'id' holds a lone surrogate"),
    ('{"text": "fine text", "meta": {"k\\ud800": [1, "x"]}}', "field 'meta' holds a lone surrogate"),
    ('{"prompt": "p", "response": "fine", "\\ud83d": 1}', "field name"),
    ('{"messages": [{"role": "user", "content": "hi \\udfff"}, {"role": "assistant", "content": "ok"}]}', "field 'messages' holds a lone surrogate"),
    ('{"id": ' + "9" * 5000 + ', "text": "x y"}', "an integer has more digits than Python reads"),
    ('{"text": "x", "a": ' + "[" * 50000 + "]" * 50000 + "}", "nested too deeply"),
    ('{"text": Infinity}', "field 'text' is inf, not text"),
    ('{"prompt": "p", "response": -Infinity}', "field 'response' is -inf, not text"),
    ('{"text": NaN}', "no recognised fields"),  # NaN is a missing value (as pandas writes it to Parquet)
    ('{"id": [1], "text": "x y"}', "field 'id' must be a string or a number"),
    ('{"text": {"a": 1}}', "field 'text' must be a string"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ["part"]}]}', "message 1 is"),
]


@pytest.mark.parametrize("line, expect", BAD_DATA, ids=[e for _, e in BAD_DATA])
def test_a_bad_record_is_one_line_naming_file_and_line(line, expect, files, tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(POOL[0]) + "\n" + line + "\n")
    out = tmp_path / "run"
    refused(main(sel(files, tiny_model_dir, out, "--method", "random", pool=bad)), capsys.readouterr().err, out, f"{bad} line 2", expect)


def test_a_lone_surrogate_in_a_json_array_file_is_refused_too(files, tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"text": "one two"}, {"text": "three \\ud800"}]')
    out = tmp_path / "run"
    refused(main(sel(files, tiny_model_dir, out, "--method", "random", pool=bad)), capsys.readouterr().err, out, f"{bad} row 2", "lone surrogate")


def test_valid_unusual_records_still_select(files, tiny_model_dir, tmp_path, capsys):
    """What is valid stays valid: numbers as text, a surrogate pair (an emoji), NUL bytes, special-token text, odd ids."""
    rows = POOL + [
        {"id": 1.5, "text": 12345678901234567890},
        {"id": "e", "prompt": "p", "response": "😀 pair"},
        {"id": "nul", "text": "a\u0000b text"},
        {"id": "tok", "prompt": "<|im_end|>", "response": "<|im_start|>assistant"},
        {"id": -0.0, "text": "minus zero id"},
    ]
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) + '{"id": "pair", "text": "an escaped pair \\ud83d\\ude00"}\n')
    rows.append("pair")
    out = tmp_path / "run"
    assert main(sel(files, tiny_model_dir, out, "--method", "random", pool=pool)) == 0, capsys.readouterr().err
    assert len((out / "scores.jsonl").read_text().splitlines()) == len(rows)


# --------------------------------------------------------------------------- evaluate: TOML types, flags


def _toml(tmp_path, files, model, line: str) -> Path:
    keys = {
        "domain_train": f'"{files["domain"]}"',
        "domain_test": f'"{files["test"]}"',
        "pool": f'"{files["pool"]}"',
        "n": "2",
        "out": f'"{tmp_path / "ev"}"',
        "model": f'"{model}"',
        "methods": '"random"',
        "seeds": "1",
    }
    k = line.split("=")[0].strip()
    keys.pop(k, None)
    path = tmp_path / "c.toml"
    path.write_text("[evaluate]\n" + "".join(f"{a} = {b}\n" for a, b in keys.items()) + line + "\n")
    return path


TOML = [
    ("n = true", "n must be an integer (got True)"),
    ("n = 2.5", "n must be an integer"),
    ('n = "2"', "n must be an integer"),
    ('overwrite = "false"', "overwrite must be true or false (got 'false')"),
    ("overwrite = 1", "overwrite must be true or false"),
    ('ft_lr = "fast"', "ft_lr must be a number"),
    ("ft_lr = nan", "ft_lr must be a finite number"),
    ("warmup_epochs = inf", "warmup_epochs must be a finite number"),
    ("lora_alpha = true", "lora_alpha must be a number"),
    ("seeds = 3.5", "seeds must be a count, list or comma-separated string of seeds"),
    ("seeds = [0, true]", "seeds holds True, not a seed"),
    ("methods = [1.5]", "methods holds 1.5, not a method name"),
    ("template = 5", "template must be a string"),
    ('device = "gpu"', "--device 'gpu': not a device"),
    ("threads = 100000", "--threads: must be at most the number of CPUs"),
    ("ft_epochs = -1", "--ft-epochs must be positive"),
    ("lora_r = 0", "--lora-r must be a positive integer"),
]


@pytest.mark.parametrize("line, expect", TOML, ids=[t for t, _ in TOML])
def test_a_bad_evaluate_config_value_is_one_line(line, expect, files, tiny_model_dir, tmp_path, capsys):
    path = _toml(tmp_path, files, tiny_model_dir, line)
    refused(main(["evaluate", "--config", str(path)]), capsys.readouterr().err, tmp_path / "ev", expect)


def test_a_bad_evaluate_config_file_is_one_line(tmp_path, capsys):
    (tmp_path / "t.toml").write_text("evaluate = 3\n")
    refused(main(["evaluate", "--config", str(tmp_path / "t.toml")]), capsys.readouterr().err, None, "'evaluate' must be a table")
    refused(main(["evaluate", "--config", str(tmp_path)]), capsys.readouterr().err, None, f"--config {tmp_path}: cannot read it")


@pytest.mark.parametrize(
    "flag, expect",
    [
        (("--ft-lr", "nan"), "--ft-lr: must be a finite number"),
        (("--lora-r", "100000"), "--lora-r: must be at most"),
        (("--device", "cuda:7"), "--device cuda:7"),
        (("--methods", "less"), "--method less needs --warmup-epochs"),
    ],
)
def test_a_bad_evaluate_flag_is_one_line(flag, expect, files, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ev"
    rc = main(
        [
            "evaluate",
            "--domain-train",
            str(files["domain"]),
            "--domain-test",
            str(files["test"]),
            "--pool",
            str(files["pool"]),
            "--n",
            "2",
            "--out",
            str(out),
            "--model",
            tiny_model_dir,
            "--seeds",
            "1",
            "--methods",
            "random",
            "--warmup-epochs",
            "0",
            *flag,
        ]
    )
    refused(rc, capsys.readouterr().err, out, expect)


# --------------------------------------------------------------------------- diagnose, demo, report


@pytest.mark.parametrize(
    "flag, expect",
    [
        (("--epochs", "inf"), "--epochs: must be a finite number"),
        (("--lr", "nan"), "--lr: must be a finite number"),
        (("--jf-outputs", "100000000"), "--jf-outputs: must be at most 4096"),
        (("--device", "foo"), "--device 'foo'"),
        (("--seed", str(10**20)), "--seed: must be at most"),
        (("--lora-target-modules", "q_prj"), "'q_prj' names no module"),
        (("--lora-target-modules", ","), "--lora-target-modules: must name modules"),
    ],
)
def test_a_bad_diagnose_flag_is_one_line(flag, expect, files, tiny_model_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "diag"
    rc = main(
        [
            "diagnose",
            "--domain",
            str(files["domain"]),
            "--pool",
            str(files["pool"]),
            "--out",
            str(out),
            "--model",
            tiny_model_dir,
            "--n-test",
            "0",
            "--epochs",
            "1",
            *flag,
        ]
    )
    refused(rc, capsys.readouterr().err, out, expect)


@pytest.mark.parametrize(
    "flag, expect",
    [
        (("--domain-size", "0"), "--domain-size and --pool-mmlu"),
        (("--pool-mmlu", "0", "--pool-reasoning", "0"), "must be positive"),
        (("--domain-size", "-1"), "--domain-size: must be a non-negative integer"),
        (("--warmup-lr", "nan"), "--warmup-lr"),
        (("--lora-target-modules", "q_prj"), "'q_prj' names no module"),
    ],
)
def test_a_bad_demo_flag_writes_no_data(flag, expect, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(
        [
            "demo",
            "--model",
            tiny_model_dir,
            "--out",
            str(out),
            "--domain-size",
            "4",
            "--pool-mmlu",
            "8",
            "--pool-reasoning",
            "0",
            "--n",
            "2",
            "--warmup-epochs",
            "0",
            *flag,
        ]
    )
    refused(rc, capsys.readouterr().err, out, expect)


def test_an_unexpected_failure_is_one_line_too(files, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """The last line of defence: a bug ends in one line (exit 1) that says how to see the traceback."""
    from ntkselect import pipeline

    def bug(*a, **k):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(pipeline, "load_inputs", bug)
    monkeypatch.delenv("NTKSELECT_DEBUG", raising=False)
    rc = main(sel(files, tiny_model_dir, tmp_path / "run"))
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "unexpected ZeroDivisionError: division by zero" in err and "NTKSELECT_DEBUG=1" in err
    monkeypatch.setenv("NTKSELECT_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(sel(files, tiny_model_dir, tmp_path / "run"))


def test_a_model_whose_embeddings_do_not_cover_its_tokenizer_is_refused(files, tokenizer, tmp_path, capsys):
    """A tokenizer from another model: refused before any work (it ended in an IndexError mid-run)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    model_dir = tmp_path / "small-vocab"
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    capsys.readouterr()
    out = tmp_path / "run"
    refused(main(sel(files, model_dir, out)), capsys.readouterr().err, out, f"its tokenizer has {len(tokenizer)} tokens but the model only 100 embeddings")
