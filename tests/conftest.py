"""Fixtures shared by several test modules: the real SmolLM2 tokenizer, a tiny random Llama built on
it, tokenized examples, and the input files of the CLI, dry-run and sharding tests (written by
the plain functions in helpers.py, which test modules import for everything that is not a fixture)."""

from __future__ import annotations

import pytest
import torch

from helpers import write_big_data, write_cli_data, write_plan_files


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: skipped, with the reason, where there is none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on one; benchmarks/gpu.sh does)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer():
    from ntkselect.model.loading import load_tokenizer

    return load_tokenizer(None)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A 2-layer random LlamaForCausalLM with the SmolLM2 vocabulary, saved as an HF folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def texts():
    """Varied lengths so that batches always need padding."""
    return [
        {"text": "The heart pumps blood through the arteries."},
        {"prompt": "What is 2 + 2?", "response": "4"},
        {"question": "Which organ filters blood?", "answer": "The kidneys filter blood and make urine."},
        {"messages": [{"role": "user", "content": "Name a bone."}, {"role": "assistant", "content": "The femur."}]},
        {"text": "Insulin is a hormone made by the pancreas that lowers blood sugar after meals, and its lack causes diabetes."},
        {"instruction": "Translate to French", "input": "good morning", "output": "bonjour"},
        {"text": "Short one."},
        {"prompt": "List three primes.", "response": "Two, three and five are the three smallest primes."},
    ]


@pytest.fixture(scope="session")
def examples(texts, tokenizer):
    from ntkselect.data.records import Record, tokenize_records

    recs = [Record(id=str(i), raw=t, path="mem.jsonl", line=i + 1) for i, t in enumerate(texts)]
    ex, _ = tokenize_records(recs, tokenizer, max_length=64, template="auto")
    return ex


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The CLI tests' inputs: (domain path, pool path, pool rows)."""
    return write_cli_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def plan_files(tmp_path_factory):
    """The dry-run tests' inputs: (domain path, pool path)."""
    return write_plan_files(tmp_path_factory.mktemp("plan"))


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """The sharding tests' inputs, a 96-record pool: (domain path, pool path)."""
    return write_big_data(tmp_path_factory.mktemp("big"))
