"""smoothq: SmoothQuant W8A8 post-training quantization for Hugging Face causal LMs.

    import smoothq as sq
    model, tok = sq.load_model("smollm2")
    model = sq.run(model, "best-w8a8", tokenizer=tok).model   # a preset, a recipe file/dict or sq.Recipe
    print(sq.perplexity(model, sq.eval_windows(tok, "wikitext2", seqlen=512, max_windows=40)))

`sq.run` orders the stages (pipeline.py); they stay public for custom pipelines: sq.rotate,
sq.calibrate, sq.smooth, sq.rotate_inputs, sq.quantize, sq.save. Each records what it did in
`model.smoothq`, a QuantRecord (record.py).
"""

from .archs import Arch, Group, UnsupportedArchError
from .calibrate import ActStats, CalibrationError, calibrate
from .cpu_fast import optimize_for_cpu
from .config import O1, O2, O3, SCHEMES, W8A8, QuantScheme, get_scheme
from .data import calib_samples, eval_windows
from .evaluate import paired_nll_difference, perplexity, window_nll
from .io import CheckpointError, load, save
from .models import load_model
from .nn import W8A8Linear, quantize
from .onnx_export import export_onnx
from .online_rotation import rotate_inputs
from .pipeline import RunResult, run
from .recipe import PRESETS, Recipe, RecipeError
from .record import QuantRecord
from .rotate import rotate
from .sequential import quantize_sequential
from .smooth import smooth, smooth_scales
from .tasks import lambada_accuracy

__version__ = "0.1.0"

__all__ = [
    "ActStats", "Arch", "CalibrationError", "CheckpointError", "load", "save", "Group", "O1", "O2", "O3", "QuantScheme", "SCHEMES",
    "UnsupportedArchError", "W8A8", "W8A8Linear", "calib_samples", "calibrate", "eval_windows",
    "export_onnx", "get_scheme", "lambada_accuracy", "load_model", "optimize_for_cpu", "PRESETS", "QuantRecord", "Recipe", "RecipeError", "RunResult", "run", "paired_nll_difference", "perplexity", "quantize", "quantize_sequential", "rotate", "rotate_inputs", "smooth", "smooth_scales", "window_nll",
]
