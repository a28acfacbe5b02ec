"""Tiny random causal LMs of the Hugging Face families ntkselect supports (built from config
classes, nothing downloaded), and synthetic examples with varied lengths and trained masks."""

from __future__ import annotations

import torch

V = 96  # vocabulary of the tiny models


def _common(**kw):
    d = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    d.update(kw)
    return d


def _build(name: str):
    import transformers as T

    if name == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(**_common(tie_word_embeddings=True)))
    if name == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(**_common()))
    if name == "qwen3":
        return T.Qwen3ForCausalLM(T.Qwen3Config(**_common(head_dim=8)))
    if name == "mistral":
        return T.MistralForCausalLM(T.MistralConfig(**_common(sliding_window=None)))
    if name == "gemma2":  # a small cap so that soft-capping really bends the tiny model's logits
        return T.Gemma2ForCausalLM(T.Gemma2Config(**_common(head_dim=8, final_logit_softcapping=0.5, attn_logit_softcapping=5.0, sliding_window=4)))
    if name == "gemma3":
        return T.Gemma3ForCausalLM(T.Gemma3TextConfig(**_common(head_dim=8, sliding_window=4, final_logit_softcapping=0.5)))
    if name == "phi3":
        return T.Phi3ForCausalLM(T.Phi3Config(**_common()))
    if name == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2))
    if name == "gpt_neox":
        return T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**_common()))
    if name == "opt":
        return T.OPTForCausalLM(T.OPTConfig(vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32,
                                            max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    if name == "falcon":
        return T.FalconForCausalLM(T.FalconConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, pad_token_id=0,
                                                  bos_token_id=1, eos_token_id=2))
    if name == "mixtral":
        return T.MixtralForCausalLM(T.MixtralConfig(**_common(num_local_experts=2, num_experts_per_tok=1, sliding_window=None)))
    if name == "qwen2_moe":
        return T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(**_common(num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16,
                                                               shared_expert_intermediate_size=32, decoder_sparse_step=1)))
    if name == "cohere":
        return T.CohereForCausalLM(T.CohereConfig(**_common(logit_scale=0.3)))
    if name == "granite":
        return T.GraniteForCausalLM(T.GraniteConfig(**_common(logits_scaling=4.0)))
    raise KeyError(name)


FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "gpt2", "gpt_neox", "opt", "falcon", "mixtral", "qwen2_moe",
            "cohere", "granite")


def tiny_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = _build(name)
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
