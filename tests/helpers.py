"""Test helpers, as plain functions (pytest fixtures live in conftest.py): tiny models and
their LoRA versions, the input files the CLI tests share, and a naive per-example gradient.

Test modules import from here (``from helpers import ...``), never from each other."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- the tiny Llama on the SmolLM2 vocabulary (conftest's tiny_model_dir) with a LoRA adapter


def make_lora_model(model_dir: str, seed: int = 0, target="all-linear", r: int = 4):
    """The tiny model with a LoRA adapter whose B matrices are random, as after a warm-up
    (peft initialises B = 0, which would make every gradient with respect to A vanish)."""
    from ntkselect.model.loading import load_model
    from ntkselect.training.warmup import WarmupOptions, add_lora

    model = add_lora(load_model(model_dir), WarmupOptions(r=r, alpha=2 * r, dropout=0.0, target_modules=target, seed=seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.eval()
    return model


def naive_gradients(model, examples, pad_id):
    """One example at a time, plain autograd on the full (B, T, V) logits:
    g(x) = ∇ (1/T) Σ_t Σ_k logit[t, k] over the positions that predict trained tokens."""
    from ntkselect.data.batching import collate
    from ntkselect.grads.fused import lora_parameters

    params = [p for _, p in lora_parameters(model)]
    out = []
    for i, e in enumerate(examples):
        b = collate([e], [i], pad_id)
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits  # (1, T, V)
        f = (logits.sum(-1) * b.target_mask).sum() / b.target_mask.sum()
        g = torch.autograd.grad(f, params)
        out.append(torch.cat([x.reshape(-1) for x in g]))
    return torch.stack(out)  # (n, D)


# --- tiny random causal LMs of the Hugging Face families ntkselect supports (built from config
# classes, nothing downloaded), and synthetic examples with varied lengths and trained masks

V = 96  # vocabulary of the tiny models


def _common(vocab: int, **kw):
    d = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    d.update(kw)
    return d


def _build(name: str, vocab: int = V):
    import transformers as T

    if name == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(**_common(vocab, tie_word_embeddings=True)))
    if name == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(**_common(vocab)))
    if name == "qwen3":
        return T.Qwen3ForCausalLM(T.Qwen3Config(**_common(vocab, head_dim=8)))
    if name == "mistral":
        return T.MistralForCausalLM(T.MistralConfig(**_common(vocab, sliding_window=None)))
    if name == "gemma2":  # a small cap so that soft-capping really bends the tiny model's logits
        return T.Gemma2ForCausalLM(T.Gemma2Config(**_common(vocab, head_dim=8, final_logit_softcapping=0.5, attn_logit_softcapping=5.0, sliding_window=4)))
    if name == "gemma3":
        return T.Gemma3ForCausalLM(T.Gemma3TextConfig(**_common(vocab, head_dim=8, sliding_window=4, final_logit_softcapping=0.5)))
    if name == "phi3":
        return T.Phi3ForCausalLM(T.Phi3Config(**_common(vocab)))
    if name == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2))
    if name == "gpt_neox":
        return T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**_common(vocab)))
    if name == "opt":
        return T.OPTForCausalLM(
            T.OPTConfig(
                vocab_size=vocab,
                hidden_size=32,
                ffn_dim=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                word_embed_proj_dim=32,
                max_position_embeddings=64,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
            )
        )
    if name == "falcon":
        return T.FalconForCausalLM(
            T.FalconConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        )
    if name == "mixtral":
        return T.MixtralForCausalLM(T.MixtralConfig(**_common(vocab, num_local_experts=2, num_experts_per_tok=1, sliding_window=None)))
    if name == "qwen2_moe":
        return T.Qwen2MoeForCausalLM(
            T.Qwen2MoeConfig(
                **_common(vocab, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16, shared_expert_intermediate_size=32, decoder_sparse_step=1)
            )
        )
    if name == "cohere":
        return T.CohereForCausalLM(T.CohereConfig(**_common(vocab, logit_scale=0.3)))
    if name == "granite":
        return T.GraniteForCausalLM(T.GraniteConfig(**_common(vocab, logits_scaling=4.0)))
    raise KeyError(name)


FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "gpt2", "gpt_neox", "opt", "falcon", "mixtral", "qwen2_moe", "cohere", "granite")


def tiny_model(name: str, seed: int = 0, vocab: int = V):
    torch.manual_seed(seed)
    model = _build(name, vocab)
    model.requires_grad_(False)
    model.eval()
    return model


def tiny_lora_model(name: str, seed: int = 0, r: int = 4):
    """The tiny model with a LoRA adapter (all-linear) whose B matrices are random, as after a warm-up."""
    from ntkselect.training.warmup import WarmupOptions, add_lora

    model = add_lora(tiny_model(name, seed), WarmupOptions(r=r, alpha=2 * r, dropout=0.0, target_modules="all-linear", seed=seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.eval()
    return model


def synthetic_examples(n: int = 6, seed: int = 0, vocab: int = V):
    """Varied lengths (batches need padding); every other example trains on its last tokens only."""
    from ntkselect.data.records import TokenizedExample

    g = torch.Generator().manual_seed(seed)
    lengths = [6, 11, 4, 9, 13, 7, 5, 10][:n]
    out = []
    for i, L in enumerate(lengths):
        ids = torch.randint(3, vocab, (L,), generator=g).tolist()
        mask = [False] + [True] * (L - 1) if i % 2 == 0 else [False] * (L - 3) + [True] * 3
        out.append(TokenizedExample(input_ids=ids, train_mask=mask, truncated=False))
    return out


# --- input files shared by several test modules (the fixtures that write them are in conftest.py)

CLI_TOPICS = ["blood pressure", "the kidney", "a fracture", "insulin", "fever", "the liver", "asthma", "a vaccine"]


def write_cli_data(d: Path):
    """The CLI tests' domain (medical questions) and a 25-record pool of three sources: (domain path, pool path, pool rows)."""
    domain = [{"question": f"What should a doctor know about {t}?", "answer": f"Facts about {t} matter in the clinic."} for t in CLI_TOPICS]
    pool = [
        {"id": f"p{i}", "prompt": f"Question {i}: tell me about {w}.", "response": f"{w.capitalize()} is topic {i}.", "source": src}
        for i, (w, src) in enumerate(
            [
                (w, s)
                for s in ("medicine", "maths", "law")
                for w in (CLI_TOPICS if s == "medicine" else ["algebra", "a contract", "primes", "torts", "integrals", "a judge", "vectors", "a treaty"])
            ]
        )
    ]
    pool.append({"text": "A plain text record about the heart and its valves."})
    return write_jsonl(d / "domain.jsonl", domain), write_jsonl(d / "pool.jsonl", pool), pool


PLAN_DOMAIN = [
    {"question": f"What should a doctor know about {t}?", "answer": f"Facts about {t} matter in the clinic."}
    for t in ["blood pressure", "the kidney", "a fracture", "insulin", "fever"]
]
PLAN_POOL = [
    {"id": f"p{i}", "prompt": f"Question {i}: tell me about {w}.", "response": f"{w.capitalize()} is topic {i}, " + "and more " * i}
    for i, w in enumerate(["algebra", "a contract", "primes", "torts", "integrals", "vectors", "asthma", "a treaty", "the liver"])
]
PLAN_POOL.append({"text": "A plain text record about the heart and its valves."})
PLAN_POOL.append(dict(PLAN_DOMAIN[2]))  # an exact copy of a domain record: excluded, as in a real run


def write_plan_files(d: Path):
    """The dry-run tests' domain and pool (with one exact copy of a domain record): (domain path, pool path)."""
    for name, rows in (("domain", PLAN_DOMAIN), ("pool", PLAN_POOL)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "domain.jsonl", d / "pool.jsonl"


def plan_config(files, model, out, **kw):
    """A small SelectConfig on :func:`write_plan_files`' inputs."""
    from ntkselect.config import SelectConfig

    dom, pool = files
    base = dict(domain=str(dom), pool=str(pool), n=3, out=str(out), model=model, threads=1, max_length=24, max_batch_tokens=64, batch_size=4)
    return SelectConfig(**{**base, **kw})


RESUME_WORDS = ["heart", "kidney", "liver", "lung", "contract", "court", "prime", "vector", "river", "poem", "engine", "virus"]


def write_big_data(d: Path):
    """A 4-question domain and a 96-record pool, enough for many shards: (domain path, pool path)."""
    W = RESUME_WORDS
    domain = [{"question": f"What does a doctor check in the {w}?", "answer": f"The {w} has to be examined with care."} for w in W[:4]]
    pool = [
        {
            "id": f"p{i}",
            "prompt": f"Item {i}: explain the {W[i % len(W)]} in {1 + i % 5} sentences.",
            "response": f"The {W[(i * 7) % len(W)]} is item {i}." + " More." * (i % 4),
        }
        for i in range(96)
    ]
    return write_jsonl(d / "domain.jsonl", domain), write_jsonl(d / "pool.jsonl", pool)


def sharded_args(big, model, out, *extra):
    """`ntkselect select` arguments on :func:`write_big_data`'s inputs."""
    dom, pool = big
    return [
        "select",
        "--domain",
        dom,
        "--pool",
        pool,
        "--n",
        6,
        "--out",
        out,
        "--model",
        model,
        "--warmup-epochs",
        1,
        "--knn-k",
        8,
        "--precision",
        "float32",
        "--threads",
        1,
        "--batch-size",
        4,
        *extra,
    ]


def run_outputs(out: Path) -> dict:
    """The selection's output files, as text, for byte-for-byte comparisons."""
    return {f: (out / f).read_text() for f in ("selected.jsonl", "scores.jsonl", "train.jsonl")}


def write_eval_data(tmp_path: Path) -> dict:
    """A tiny domain of lettered questions, its test split, and a pool with one test question planted in it."""

    def q(i, topic):
        return {
            "id": f"{topic}{i}",
            "prompt": f"About {topic} {i}?\nA. yes\nB. no\nC. maybe\nD. never\nAnswer:",
            "response": "A. yes",
            "answer": "A",
            "subject": topic,
        }

    train = [q(i, "heart") for i in range(6)]
    test = [{**q(i, "heart"), "options": ["A", "B", "C", "D"]} for i in range(6, 10)]
    pool = [
        {
            "id": f"p{i}",
            "prompt": f"Tell me about {w} {i}.",
            "response": f"{w} fact {i}.",
            "source": w,
            "relation": "related" if w in ("heart", "kidney") else "unrelated",
        }
        for i, w in enumerate(["law", "math", "heart", "kidney"] * 3)
    ]
    pool.append({**test[0], "id": "leak"})  # a test question in the pool: must never be selected
    extra = [q(i, "heart") for i in range(10, 15)]  # the oracle's in-domain records
    paths = {}
    for name, rows in (("train", train), ("test", test), ("pool", pool), ("extra", extra)):
        paths[name] = tmp_path / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


# --- the data-file formats ntkselect reads


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def write_any(tmp_path, fmt, rows, name="data"):
    if fmt == "jsonl":
        return write_jsonl(tmp_path / f"{name}.jsonl", rows)
    if fmt == "json":
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps(rows), encoding="utf-8")
        return p
    if fmt == "csv":
        return write_csv(tmp_path / f"{name}.csv", rows)
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        p = tmp_path / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), p)
        return p
    if fmt == "hf":
        import datasets

        p = tmp_path / name
        datasets.Dataset.from_list(rows).save_to_disk(str(p))
        return p
    raise AssertionError(fmt)


FORMATS = ["jsonl", "json", "csv", "parquet", "hf"]
