"""smoothq: SmoothQuant W8A8 post-training quantization for Hugging Face causal LMs.

    import smoothq as sq
    model, tok = sq.load_model("smollm2")
    model = sq.run(model, "best-w8a8", tokenizer=tok).model   # a preset, a recipe file/dict or sq.Recipe
    print(sq.perplexity(model, sq.eval_windows(tok, "wikitext2", seqlen=512, max_windows=40)))

`sq.run` orders the stages (pipeline/run.py); they stay public for custom pipelines: sq.rotate,
sq.calibrate, sq.smooth, sq.rotate_inputs, sq.quantize, sq.save. Each records what it did in
`model.smoothq`, a QuantRecord (core/record.py).

The public names are imported on first use (PEP 562): importing torch and transformers takes
seconds, and `smoothq --help` (smoothq.cli.app, inside this package) must not pay for them.
"""

import importlib

__version__ = "0.1.0"

# public name -> the submodule that defines it
_PUBLIC = {
    "Arch": "archs",
    "Group": "archs",
    "UnsupportedArchError": "archs",
    "ActStats": "transforms.calibrate",
    "CalibrationError": "core.forward",
    "calibrate": "transforms.calibrate",
    "optimize_for_cpu": "runtime.cpu_fast",
    "O1": "core.schemes",
    "O2": "core.schemes",
    "O3": "core.schemes",
    "SCHEMES": "core.schemes",
    "W8A8": "core.schemes",
    "QuantScheme": "core.schemes",
    "get_scheme": "core.schemes",
    "calib_samples": "core.data",
    "eval_windows": "core.data",
    "paired_nll_difference": "core.perplexity",
    "perplexity": "core.perplexity",
    "window_nll": "core.perplexity",
    "CheckpointError": "formats.tensors",
    "load": "formats.load",
    "save": "formats.io",
    "load_model": "core.models",
    "W8A8Linear": "runtime.linear",
    "quantize": "transforms.quantize",
    "export_onnx": "formats.onnx",
    "rotate_inputs": "transforms.online_rotation",
    "RunResult": "pipeline.run",
    "run": "pipeline.run",
    "PRESETS": "core.recipe",
    "Recipe": "core.recipe",
    "RecipeError": "core.recipe",
    "QuantRecord": "core.record",
    "rotate": "transforms.rotate",
    "quantize_sequential": "pipeline.layered",
    "smooth": "transforms.smooth",
    "smooth_scales": "transforms.smooth",
    "lambada_accuracy": "evaluation.tasks",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'smoothq' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value  # once: later look-ups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
