"""Bad input through the real CLI: one clear line, a non-zero exit, no traceback, and nothing
in --out that a rerun would trust (no manifest.json), for every problem the issue lists; and
the two non-fatal cases (overlong examples, pool records that duplicate domain records)."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ntkselect.cli.main import main

DOMAIN = [
    {"id": f"d{i}", "question": f"What should a doctor know about {t}?", "answer": f"Facts about {t} matter in the clinic."}
    for i, t in enumerate(["blood pressure", "the kidney", "a fracture", "insulin"])
]
POOL = [
    {"id": f"p{i}", "prompt": f"Question {i}: tell me about {w}.", "response": f"{w.capitalize()} is topic {i}."}
    for i, w in enumerate(["algebra", "a contract", "primes", "torts", "integrals", "fever", "vectors", "asthma"])
]
WEIRD = {"id": "weird", "text": "zxqvj platypus"}  # the only record with these tokens (see nan_model_dir)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad-input")
    return {"domain": write_jsonl(d / "domain.jsonl", DOMAIN), "pool": write_jsonl(d / "pool.jsonl", POOL), "dir": d}


@pytest.fixture(scope="module")
def nochat_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a tokenizer that has no chat template."""
    out = tmp_path_factory.mktemp("nochat") / "model"
    shutil.copytree(tiny_model_dir, out)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    from ntkselect.model.loading import load_tokenizer

    assert not load_tokenizer(str(out)).chat_template
    return str(out)


@pytest.fixture(scope="module")
def nan_model_dir(tokenizer, tmp_path_factory):
    """A tiny untied Llama whose input embedding is NaN for one token that only WEIRD contains,
    so exactly that example's forward pass (and gradient) is non-finite. Untied: with tied
    weights the NaN row would also be in the LM head and poison every example."""
    from transformers import LlamaConfig, LlamaForCausalLM

    others: set[int] = set()
    for r in DOMAIN + POOL:
        for v in r.values():
            others |= set(tokenizer(str(v))["input_ids"])
    only_weird = sorted(set(tokenizer(WEIRD["text"])["input_ids"]) - others)
    assert only_weird
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight[only_weird[-1]] = float("nan")  # (V, d) row of one token
    out = tmp_path_factory.mktemp("nan-model")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def select_args(files, model, out, *extra, domain=None, pool=None, n=2):
    return [
        "select",
        "--domain",
        str(domain or files["domain"]),
        "--pool",
        str(pool or files["pool"]),
        "--n",
        str(n),
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


def assert_clean_failure(rc: int, err: str, out: Path, expect: list[str], alone: bool = True) -> str:
    """Exit 2, one error line (the last line of stderr; the only line when ``alone``), holding
    every string of ``expect``, no traceback, and no manifest.json in --out."""
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith("ntkselect: error: "), err
    assert sum("error" in line.lower() for line in lines) == 1, err
    if alone:
        assert len(lines) == 1, err
    for s in expect:
        assert s in lines[-1], (s, lines[-1])
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("**/*.tmp")) if out.exists() else True
    return lines[-1]


# --------------------------------------------------------------------------- each problem, through main()


def _case(name, tmp_path, files, tiny_model_dir, nochat_model_dir, nan_model_dir):
    """(argv, strings the error must hold, whether the error is the only stderr line)."""
    out = tmp_path / "run"
    bad = tmp_path / "bad.jsonl"
    args = lambda *extra, **kw: select_args(files, kw.pop("model", tiny_model_dir), out, *extra, **kw)  # noqa: E731
    if name == "malformed-jsonl":
        bad.write_text(json.dumps(POOL[0]) + '\n{"text": broken\n' + json.dumps(POOL[1]) + "\n")
        return args(pool=bad), [f"{bad} line 2", "not valid JSON", "fix or remove the line"], True
    if name == "no-recognised-fields":
        write_jsonl(bad, POOL[:2] + [{"id": "x", "body": "some text", "label": 1}])
        return args(pool=bad), [f"{bad} line 3", "no recognised fields", "'body'", "'label'", "prompt+response", "rename"], True
    if name == "empty-text":
        write_jsonl(bad, POOL[:1] + [{"text": "   "}])
        return args(domain=bad), [f"{bad} line 2", "empty text", "remove the record"], True
    if name == "empty-response":
        write_jsonl(bad, POOL[:1] + [{"prompt": "p", "response": ""}])
        return args(pool=bad), [f"{bad} line 2", "empty response", "remove the record"], True
    if name == "duplicate-ids":
        write_jsonl(bad, POOL[:3] + [{**POOL[3], "id": "p1"}])
        return args(pool=bad), [str(bad), "duplicate id 'p1'", "line 2 and line 4", "unique within each file", "unique id"], True
    if name == "duplicate-row-number-id":
        write_jsonl(bad, [{"text": "first record"}, {"id": "0", "text": "second record"}])
        return args(pool=bad, n=1), [str(bad), "duplicate id '0'", "line 1 and line 2", "row number"], True
    if name == "n-larger-than-pool":
        return args(n=1000), ["--n 1000", "larger than the pool", "8 usable records", "lower --n"], True
    if name == "n-zero":
        return args(n=0), ["--n", "positive integer", "got 0"], True
    if name == "n-negative":
        return args(n=-3), ["--n", "positive integer", "got -3"], True
    if name == "empty-domain":
        bad.write_text("\n  \n")
        return args(domain=bad), [f"{bad}: has no records", "add at least one record"], True
    if name == "empty-pool":
        bad.write_text("")
        return args(pool=bad), [f"{bad}: has no records", "add at least one record"], True
    if name == "missing-pool":
        return args(pool=tmp_path / "nope.jsonl"), ["nope.jsonl: no such file", "check the path"], True
    if name == "unknown-model-path":
        return args(model=tmp_path / "no-such-model"), ["--model", "no-such-model", "Hugging Face causal-LM folder"], True
    if name == "model-folder-without-a-model":
        (tmp_path / "empty-model").mkdir()
        return args(model=tmp_path / "empty-model"), ["--model", "empty-model", "Hugging Face causal-LM folder"], True
    if name == "messages-without-chat-template":
        write_jsonl(bad, [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there!"}]}])
        return args(domain=bad, model=nochat_model_dir), [f"{bad} line 1", "chat template", "--template plain"], True
    if name == "unwritable-out":
        blocker = tmp_path / "a-file"
        blocker.write_text("not a folder")
        return select_args(files, tiny_model_dir, blocker / "run"), ["cannot write to --out", "a-file", "choose a writable folder"], True
    if name == "nan-gradient":
        # M = 5 x 2 >= the 9 pool records: every candidate reaches stage 2, where f is checked
        return args("--preselect-factor", 5, pool=write_jsonl(bad, POOL + [WEIRD]), model=nan_model_dir), ["'weird'", "non-finite"], False
    raise AssertionError(name)


CASES = [
    "malformed-jsonl",
    "no-recognised-fields",
    "empty-text",
    "empty-response",
    "duplicate-ids",
    "duplicate-row-number-id",
    "n-larger-than-pool",
    "n-zero",
    "n-negative",
    "empty-domain",
    "empty-pool",
    "missing-pool",
    "unknown-model-path",
    "model-folder-without-a-model",
    "messages-without-chat-template",
    "unwritable-out",
    "nan-gradient",
]


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_line_exit_2_and_nothing_trusted(name, tmp_path, files, tiny_model_dir, nochat_model_dir, nan_model_dir, capsys):
    argv, expect, alone = _case(name, tmp_path, files, tiny_model_dir, nochat_model_dir, nan_model_dir)
    rc = main(argv)
    err = capsys.readouterr().err
    out = Path(argv[argv.index("--out") + 1])
    assert_clean_failure(rc, err, out, expect, alone)


@pytest.mark.parametrize("name", ["no-recognised-fields", "messages-without-chat-template"])
def test_bad_input_in_a_subprocess_has_no_traceback(name, tmp_path, files, tiny_model_dir, nochat_model_dir, nan_model_dir):
    """The real entry point (``python -m ntkselect``): stderr is exactly the one error line."""
    argv, expect, _ = _case(name, tmp_path, files, tiny_model_dir, nochat_model_dir, nan_model_dir)
    proc = subprocess.run([sys.executable, "-m", "ntkselect", *argv], capture_output=True, text=True, timeout=300)
    assert_clean_failure(proc.returncode, proc.stderr, Path(argv[argv.index("--out") + 1]), expect, alone=True)


# --------------------------------------------------------------------------- a full disk


class _FullDisk:
    """A file whose writes run out of space after ``budget`` characters (the first part lands)."""

    def __init__(self, f, budget: int):
        self._f, self._budget = f, budget

    def write(self, s):
        if len(s) > self._budget:
            self._f.write(s[: self._budget])
            self._budget = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self._budget -= len(s)
        return self._f.write(s)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


def _fill_disk_on(monkeypatch, name: str, budget: int = 40) -> None:
    """Every file ntkselect.files opens for ``name`` runs out of space after ``budget`` characters."""
    import builtins

    import ntkselect.files as nio

    def fake_open(path, *a, **kw):
        f = builtins.open(path, *a, **kw)
        return _FullDisk(f, budget) if f".{name}." in Path(path).name else f

    monkeypatch.setattr(nio, "open", fake_open, raising=False)


def test_full_disk_during_a_write_is_one_line_and_leaves_nothing_trusted(files, tiny_model_dir, tmp_path, monkeypatch, capsys):
    _fill_disk_on(monkeypatch, "scores.jsonl")
    out = tmp_path / "run"
    rc = main(select_args(files, tiny_model_dir, out, "--method", "random"))
    line = assert_clean_failure(rc, capsys.readouterr().err, out, ["no space left on device", str(out), "free some space"], alone=False)
    assert "rerun" in line
    assert not (out / "scores.jsonl").exists()  # the half-written temporary was removed, not renamed into place
    assert not [p.name for p in out.iterdir() if p.name.startswith(".scores.jsonl")]
    # the rerun, with space again, treats the folder as unfinished and starts over
    monkeypatch.undo()
    assert main(select_args(files, tiny_model_dir, out, "--method", "random")) == 0
    assert "unfinished run" in capsys.readouterr().out
    assert (out / "manifest.json").exists() and len((out / "scores.jsonl").read_text().splitlines()) == len(POOL)


def test_full_disk_error_names_the_file(tmp_path, monkeypatch):
    from ntkselect.errors import NtkSelectError
    from ntkselect.files import atomic_write_jsonl

    _fill_disk_on(monkeypatch, "scores.jsonl")
    target = tmp_path / "scores.jsonl"
    with pytest.raises(NtkSelectError) as e:
        atomic_write_jsonl(target, ({"id": i, "score": 0.5} for i in range(100)))
    msg = str(e.value)
    assert str(target) in msg and "no space left" in msg and "free" in msg
    assert list(tmp_path.iterdir()) == []


def test_nan_embedding_in_stage1_names_the_example(files, nan_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    pool = write_jsonl(tmp_path / "pool.jsonl", POOL + [WEIRD])
    rc = main(select_args(files, nan_model_dir, out, "--method", "embedding", pool=pool))
    assert_clean_failure(rc, capsys.readouterr().err, out, ["'weird'", "non-finite"], alone=False)


# --------------------------------------------------------------------------- not fatal


def test_ids_may_repeat_across_domain_and_pool(files, tiny_model_dir, tmp_path, capsys):
    pool = write_jsonl(tmp_path / "pool.jsonl", [{**r, "id": f"d{i}"} for i, r in enumerate(POOL)])  # d0..d3 are domain ids too
    assert main(select_args(files, tiny_model_dir, tmp_path / "run", "--method", "random", pool=pool)) == 0
    ids = [json.loads(line)["id"] for line in (tmp_path / "run" / "scores.jsonl").read_text().splitlines()]
    assert sorted(ids) == sorted(f"d{i}" for i in range(len(POOL)))


def test_overlong_examples_are_truncated_and_counted(files, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(select_args(files, tiny_model_dir, out, "--method", "random", "--max-length", 12)) == 0
    printed = capsys.readouterr().out
    assert f"truncated {len(POOL)} of {len(POOL)} pool examples to --max-length 12" in printed
    tokens = json.loads((out / "manifest.json").read_text())["tokens"]
    assert tokens["pool"]["truncated"] == len(POOL) and tokens["domain"]["truncated"] == len(DOMAIN)
    assert tokens["pool"]["tokens"] == 12 * len(POOL)


def test_pool_duplicates_of_domain_are_reported_and_excluded(files, tiny_model_dir, tmp_path, capsys):
    copy = {k: v for k, v in DOMAIN[1].items() if k != "id"}  # the same record under another id is still a duplicate
    pool = write_jsonl(tmp_path / "pool.jsonl", POOL + [{**copy, "id": "copy"}])
    out = tmp_path / "run"
    assert main(select_args(files, tiny_model_dir, out, "--method", "random", pool=pool)) == 0
    assert "excluded 1 pool records that duplicate a domain record exactly" in capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    assert m["inputs"]["pool"]["excluded_duplicates_of_domain"] == 1 and m["summary"]["n_pool"] == len(POOL)
    assert "copy" not in [json.loads(line)["id"] for line in (out / "scores.jsonl").read_text().splitlines()]
