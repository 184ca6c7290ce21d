"""A tiny random model of any causal-LM model type transformers knows, built from the type's own
config class (`CONFIG_MAPPING[type]()`, never the Hub) with its size fields shrunk by name.

  causal_lm_types()   every type of transformers' causal-LM mapping, sorted
  tiny_config(type)   the default config shrunk, plus {field: (old, new)} of what was shrunk (shrink.py)
  tiny_model(type)    a random model in eval mode, norms perturbed away from identity
  build_report(type)  tries to build one and run a forward; says why not in one line

The shrinking and its per-type fixes (`OVERRIDES`) are in shrink.py. `OUT_OF_SCOPE` names the
types that are no decoder-only text LM.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

# the sizes and the per-type fixes, read and tuned through this module too (tiny.HIDDEN, tiny.OVERRIDES)
from .shrink import (  # noqa: F401
    EXPERTS,
    FFN,
    HEAD_DIM,
    HEADS,
    HIDDEN,
    KV_HEADS,
    MAX_LAYERS,
    MAX_POS,
    MOE_FFN,
    OVERRIDES,
    TOPK,
    VOCAB,
    tiny_config,
)

SEQ = 16

# Types that are no decoder-only text LM, with the reason (the benchmark does not build them).
_ENC_DEC = "encoder-decoder: out of scope"
_ENCODER = "encoder model used as a decoder: out of scope"
_AUDIO = "audio/speech model: out of scope"
OUT_OF_SCOPE: dict[str, str] = {
    **dict.fromkeys(
        [
            "bart",
            "bigbird_pegasus",
            "blenderbot",
            "blenderbot-small",
            "marian",
            "mbart",
            "mvp",
            "pegasus",
            "plbart",
            "prophetnet",
        ],
        _ENC_DEC,
    ),
    "trocr": "decoder of an image-to-text encoder-decoder: out of scope",
    **dict.fromkeys(["whisper", "moss_transcribe_diarize", "musicgen", "musicgen_melody", "moshi"], _AUDIO),
    **dict.fromkeys(
        [
            "bert",
            "bert-generation",
            "big_bird",
            "camembert",
            "data2vec-text",
            "electra",
            "ernie",
            "megatron-bert",
            "rembert",
            "roberta",
            "roberta-prelayernorm",
            "roc_bert",
            "roformer",
            "xlm-roberta",
            "xlm-roberta-xl",
            "xmod",
        ],
        _ENCODER,
    ),
    **dict.fromkeys(
        ["gemma4_assistant", "gemma4_unified_assistant"],
        "draft (assistant) model: its forward needs the target model's shared KV states",
    ),
    "xlm": "cross-lingual masked LM (XLM) used as a decoder: out of scope",
    "xlnet": "permutation LM with two-stream attention: out of scope",
    "git": "image-to-text model (vision encoder + text decoder): out of scope",
}


# module names that mark a vision/audio tower in a model the causal-LM mapping builds
_MULTIMODAL = re.compile(r"vision|audio|image|visual|vqmodel|embed_tokens_extend")


def causal_lm_types() -> list[str]:
    """Every model type of transformers' causal-LM mapping, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _perturb(model: nn.Module, seed: int) -> None:
    """Norm weights away from identity (w + U[0.25, 0.75)), norm biases small random: smoothing then
    folds something nontrivial into them."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if "norm" not in type(module).__name__.lower():
                continue
            w = getattr(module, "weight", None)
            if isinstance(w, torch.Tensor) and w.is_floating_point() and w.dim() >= 1:
                r = torch.rand(w.shape, generator=g).to(w.dtype)
                w.copy_(w + 0.5 * r + 0.25)
            b = getattr(module, "bias", None)
            if isinstance(b, torch.Tensor) and b.is_floating_point():
                b.copy_(0.1 * torch.randn(b.shape, generator=g).to(b.dtype))
        # zero-initialised gains and weights (Gemma 3n's AltUp output scale) are trained away from zero in
        # any real checkpoint; left at zero they starve the linears behind them of any input
        for name, p in model.named_parameters():
            if p.is_floating_point() and p.dim() <= 2 and not name.endswith("bias") and not bool(p.any()):
                r = torch.rand(p.shape, generator=g) if p.dim() == 1 else 0.02 * torch.randn(p.shape, generator=g)
                p.copy_((0.5 * r + 0.25 if p.dim() == 1 else r).to(p.dtype))


def _sanitize(model: nn.Module) -> None:
    """Parameters or buffers a model leaves uninitialized (torch.empty) would make logits NaN."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point() and not torch.isfinite(t).all():
                t.copy_(torch.nan_to_num(t, nan=0.0, posinf=1.0, neginf=-1.0))


def tiny_model(model_type: str, seed: int = 0, dtype=torch.float32) -> nn.Module:
    """A tiny random model of `model_type` in eval mode, deterministic for a seed."""
    from transformers import AutoModelForCausalLM

    cfg, _ = tiny_config(model_type)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="eager").eval()
    _sanitize(model)
    _perturb(model, seed)
    return model


def random_ids(batch: int = 2, seq: int = SEQ, seed: int = 0) -> torch.Tensor:
    """Token ids that avoid the special tokens (kept at 0..2 and at the top of the vocabulary)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB * 3 // 4, (batch, seq), generator=g)


def forward(model: nn.Module, input_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of one forward on random ids. A model whose default cache cannot be built from its config
    (blt: DynamicCache reads num_hidden_layers off a config that has none) runs without a cache."""
    ids = random_ids() if input_ids is None else input_ids
    with torch.no_grad():
        try:
            out = model(input_ids=ids)
        except AttributeError as e:
            if "num_hidden_layers" not in str(e):
                raise
            out = model(input_ids=ids, use_cache=False)
    return out.logits if hasattr(out, "logits") else out[0]


def _scope(model_type: str, cfg=None) -> str | None:
    if model_type in OUT_OF_SCOPE:
        return OUT_OF_SCOPE[model_type]
    if cfg is not None and getattr(cfg, "is_encoder_decoder", False):
        return _ENC_DEC
    return None


def _first_line(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
    msg = lines[0] if lines else ""
    if msg.endswith(":") and len(lines) > 1:  # strict-dataclass validation: the reason is on the next line
        msg = lines[1]
    return f"{type(e).__name__}: {msg}"[:300]


def build_report(model_type: str) -> dict:
    """Tries to build the type's tiny model and run one forward: {"type", "builds", "why" (one line, empty
    when it builds and is a decoder-only text model), "class", "shrunk" ({field: [old, new]}),
    "decoder_only_text", "params"}. Out-of-scope types are not built."""
    rep: dict[str, Any] = {
        "type": model_type,
        "builds": False,
        "why": "",
        "class": "",
        "shrunk": {},
        "decoder_only_text": False,
        "params": 0,
    }
    why = _scope(model_type)
    if why:
        rep["why"] = why
        return rep
    try:
        cfg, shrunk = tiny_config(model_type)
    except Exception as e:  # noqa: BLE001
        rep["why"] = "config: " + _first_line(e)
        return rep
    rep["shrunk"] = {k: [_short(o), _short(n)] for k, (o, n) in shrunk.items()}
    why = _scope(model_type, cfg)
    if why:
        rep["why"] = why
        return rep
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    # a multimodal wrapper (the mapping's class is *ForConditionalGeneration, or the model carries a
    # vision/audio tower) builds and runs on text, but is no decoder-only text model
    rep["decoder_only_text"] = "ConditionalGeneration" not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, "")
    try:
        model = tiny_model(model_type)
    except Exception as e:  # noqa: BLE001
        rep["why"] = "build: " + _first_line(e)
        return rep
    rep["class"] = type(model).__name__
    rep["params"] = sum(p.numel() for p in model.parameters())
    towers = list(
        dict.fromkeys(
            n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if _MULTIMODAL.search(n.rsplit(".", 1)[-1])
        )
    )
    if towers:
        rep["decoder_only_text"] = False
    try:
        logits = forward(model)
    except Exception as e:  # noqa: BLE001
        rep["why"] = "forward: " + _first_line(e)
        return rep
    if not torch.isfinite(logits).all():
        rep["why"] = "forward: logits not finite"
        return rep
    if tuple(logits.shape[:2]) != (2, SEQ):
        rep["why"] = f"forward: logits of shape {tuple(logits.shape)}"
        return rep
    if rep["params"] > 5_000_000:
        rep["why"] = f"too large: {rep['params']} parameters"
        return rep
    rep["builds"] = True
    if not rep["decoder_only_text"]:
        rep["why"] = (
            "multimodal: builds and runs on text, but carries " + ", ".join(towers[:2])
            if towers
            else f"multimodal wrapper ({rep['class']}): its text model is the decoder"
        )
    return rep


def _short(v) -> Any:
    if isinstance(v, (list, dict)) and len(repr(v)) > 80:
        return repr(v)[:77] + "..."
    return v
