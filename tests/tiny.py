"""Tiny random models for every architecture in the table, built from transformers configs
(no downloads), plus a tokenizer trained on the shared data in a second."""

from __future__ import annotations

import torch
import transformers as T

VOCAB = 256
_COMMON = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_LLAMA_LIKE = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **_COMMON
)

CONFIGS = {
    "llama": lambda: T.LlamaConfig(**_LLAMA_LIKE),
    "mistral": lambda: T.MistralConfig(**_LLAMA_LIKE),
    "qwen2": lambda: T.Qwen2Config(**_LLAMA_LIKE),
    "qwen3": lambda: T.Qwen3Config(head_dim=16, **_LLAMA_LIKE),
    "gemma": lambda: T.GemmaConfig(head_dim=16, **_LLAMA_LIKE),
    "gemma2": lambda: T.Gemma2Config(head_dim=16, **_LLAMA_LIKE),
    "gemma3_text": lambda: T.Gemma3TextConfig(head_dim=16, **_LLAMA_LIKE),
    "phi3": lambda: T.Phi3Config(**{**_LLAMA_LIKE, "num_key_value_heads": 4}),
    "glm": lambda: T.GlmConfig(head_dim=16, **_LLAMA_LIKE),
    "glm4": lambda: T.Glm4Config(head_dim=16, **_LLAMA_LIKE),
    "mixtral": lambda: T.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **_LLAMA_LIKE),
    "opt": lambda: T.OPTConfig(
        hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64, **_COMMON
    ),
    "bloom": lambda: T.BloomConfig(hidden_size=64, n_layer=2, n_head=4, **_COMMON),
    "falcon-7b": lambda: T.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, **_COMMON),
    "falcon-40b": lambda: T.FalconConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_kv_heads=2,
        new_decoder_architecture=True,
        **_COMMON,
    ),
    "falcon-rw": lambda: T.FalconConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        parallel_attn=False,
        alibi=True,
        multi_query=False,
        **_COMMON,
    ),
    "gpt2": lambda: T.GPT2Config(n_embd=64, n_layer=2, n_head=4, **_COMMON),
    "gpt_neox": lambda: T.GPTNeoXConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, **_COMMON
    ),
    "gpt_neox-sequential": lambda: T.GPTNeoXConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        use_parallel_residual=False,
        **_COMMON,
    ),
}


def tiny_model(name: str, seed: int = 0, dtype=torch.float32):
    """A random model whose norms have random (not identity) weights and biases, so smoothing
    folds something nontrivial into them."""
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(CONFIGS[name](), dtype=dtype, attn_implementation="eager").eval()
    with torch.no_grad():
        for mod_name, module in model.named_modules():
            w = getattr(module, "weight", None)
            if isinstance(w, torch.Tensor) and w.dim() == 1 and "norm" in type(module).__name__.lower():
                w.copy_(w + 0.5 * torch.rand_like(w) + 0.25)
                b = getattr(module, "bias", None)
                if isinstance(b, torch.Tensor):
                    b.copy_(0.1 * torch.randn_like(b))
    return model


def four_layer_llama(vocab_size: int = VOCAB):
    """A float Llama of 4 layers (hidden 64, grouped-query attention), seed 0: long enough for a
    layered run to be interrupted between layers."""
    torch.manual_seed(0)
    config = T.LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        pad_token_id=0,
    )
    return T.AutoModelForCausalLM.from_config(config, attn_implementation="eager")


def plant_outliers(model, groups, factor: float = 10.0, fraction: float = 0.1, seed: int = 0) -> None:
    """Make a few input channels of each group `factor` times larger in the activations and
    correspondingly smaller in the weights: the float model is unchanged, but its activations now
    have the outlier channels real LLMs have."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for g in groups:
            norm = g["prev"]
            k = norm.weight.shape[0]
            idx = torch.randperm(k, generator=gen)[: max(1, int(fraction * k))]
            norm.weight[idx] *= factor
            if getattr(norm, "bias", None) is not None:
                norm.bias[idx] *= factor
            for lin in g["linears"]:
                lin.weight[:, idx] /= factor


def sample_ids(n: int = 4, length: int = 16, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, length), generator=gen)


def tiny_tokenizer(text: str, vocab_size: int = VOCAB, add_bos: bool = False):
    """A byte-level BPE tokenizer trained on `text` (offline, ~1 s). `add_bos=True`: it puts its
    BOS `<s>` in front of every text, as Gemma's and Llama's tokenizers do (by default it adds
    nothing, as SmolLM2's and GPT-2's do)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
