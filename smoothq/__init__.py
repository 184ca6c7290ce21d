"""smoothq: SmoothQuant W8A8 post-training quantization for Hugging Face causal LMs.

    import smoothq as sq
    model, tok = sq.load_model("smollm2")
    model = sq.run(model, "best-w8a8", tokenizer=tok).model   # a preset, a recipe file/dict or sq.Recipe
    print(sq.perplexity(model, sq.eval_windows(tok, "wikitext2", seqlen=512, max_windows=40)))

`sq.run` orders the stages (pipeline.py); they stay public for custom pipelines: sq.rotate,
sq.calibrate, sq.smooth, sq.rotate_inputs, sq.quantize, sq.save. Each records what it did in
`model.smoothq`, a QuantRecord (record.py).

The public names are imported on first use (PEP 562): importing torch and transformers takes
seconds, and `smoothq --help` (smoothq.cli, inside this package) must not pay for them.
"""

import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> the submodule that defines it
_PUBLIC = {
    "Arch": "archs", "Group": "archs", "UnsupportedArchError": "archs",
    "ActStats": "calibrate", "CalibrationError": "calibrate", "calibrate": "calibrate",
    "optimize_for_cpu": "cpu_fast",
    "O1": "config", "O2": "config", "O3": "config", "SCHEMES": "config", "W8A8": "config", "QuantScheme": "config",
    "get_scheme": "config",
    "calib_samples": "data", "eval_windows": "data",
    "paired_nll_difference": "evaluate", "perplexity": "evaluate", "window_nll": "evaluate",
    "CheckpointError": "io", "load": "io", "save": "io",
    "load_model": "models",
    "W8A8Linear": "nn", "quantize": "nn",
    "export_onnx": "onnx_export",
    "rotate_inputs": "online_rotation",
    "RunResult": "pipeline", "run": "pipeline",
    "PRESETS": "recipe", "Recipe": "recipe", "RecipeError": "recipe",
    "QuantRecord": "record",
    "rotate": "rotate",
    "quantize_sequential": "sequential",
    "smooth": "smooth", "smooth_scales": "smooth",
    "lambada_accuracy": "tasks",
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


class _Package(types.ModuleType):
    """sq.calibrate, sq.rotate and sq.smooth are functions that share their names with submodules:
    importing such a submodule must not replace the function on the package (the eager imports
    this replaced left the function there too)."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _PUBLIC.get(name) == name:
            return  # the submodule stays reachable as sys.modules["smoothq.<name>"]
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
