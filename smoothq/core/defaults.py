"""The defaults and choices the command line shows, in a module that imports nothing: `smoothq
--help` builds its parser from them without importing torch (seconds). The modules that use them
import them from here (data, models, bench, inspect, rotate, recipe); backends.names() and
archs.OPTIONS are checked against BACKENDS and SMOOTHING_OPTIONS by a test (backends register
themselves at import; archs is the table's own module)."""

DEFAULT_MODEL = "smollm2"
DEFAULT_CALIB = "wikitext2-train"
DEFAULT_EVAL = "wikitext2"
BOS_PROTOCOLS = ("auto", "window", "stream", "none")
BACKENDS = ("auto", "emulated", "torch", "triton")  # = backends.names()
ROTATIONS = ("hadamard", "orthogonal")  # rotate.KINDS
SMOOTHING_OPTIONS = ("attn_vo", "mlp_updown", "opt_fc")  # = archs.OPTIONS (the recipe checks names against them)
BENCH_CONFIGS = ("fp32", "bf16", "w8a8", "o3")
# smoothq inspect: rows of the kept input sample per linear, enough for stable SQNRs with bounded
# memory (tokens x the sum of the distinct input widths x 4 bytes; SmolLM2-135M at 256: ~100 MB)
INSPECT_TOKENS = 256
INSPECT_HEAT_TOKENS = 128  # tokens of calibration sample 0 in each token x channel map

# One set of defaults for every subcommand (and the library functions that take the same values):
# `smoothq eval OUT` measures what `smoothq quantize --eval` and `smoothq compare` print, and what
# the README's figures are (WikiText-2 test, 40 windows of 512 tokens).
EVAL_SEQLEN = 512  # tokens per evaluation window (eval, quantize --eval, compare; data.eval_windows)
EVAL_WINDOWS = 40  # evaluation windows: the first N of the text (a large N evaluates all of them)
DEFAULT_ALPHA = 0.8  # migration strength (recipe.Smoothing.alpha; quantize --alpha)
DEFAULT_SCHEME = "W8A8"  # recipe.Recipe.scheme; quantize --scheme
CALIB_SAMPLES = 128  # calibration sequences (recipe.Calibration.samples; data.calib_samples n)
CALIB_SEQLEN = 512  # tokens per calibration sequence (recipe.Calibration.seqlen; data.calib_samples)
SEARCH_SAMPLES = 4  # --alpha auto: calibration sequences the block search runs on (recipe.Search.samples)
GUARD_SAMPLES = 16  # --alpha auto: calibration sequences the end-to-end guard scores on (recipe.Search)
CLIP_PERCENTILE = 99.9  # recipe.Clip.percentile
DTYPES = ("float32", "float16", "bfloat16")  # --dtype: what a model is loaded and run in
DEFAULT_DTYPE = "float32"
SAVE_DTYPE = "float16"  # float tensors of a saved checkpoint (recipe.Output.dtype; quantize --save-dtype)
# smoothq compare (`make compare`, the first thing a newcomer runs): FP32, naive W8A8 and O3, the
# paper's recipe (the `paper` preset: O3, alpha 0.5) and smoothq's best W8A8 preset, each with
# LAMBADA on its first passages: within 10 minutes on 2 cores. best-o3 needs two more calibration
# passes and its clipping search, which the budget does not hold: --presets paper,best-w8a8,best-o3.
# The paper's whole grid: --schemes O1,O2,O3,W8A8 --alphas 0.5,0.8
COMPARE_SCHEMES = ("W8A8", "O3")
COMPARE_ALPHAS = ()
COMPARE_PRESETS = ("paper", "best-w8a8")
COMPARE_LAMBADA = 100
# smoothq inspect measures the paper's alpha on a per-tensor scheme with every exact group, unless
# a recipe says otherwise (evaluation.inspect.inspect_model's defaults)
INSPECT_ALPHA = 0.5
INSPECT_SCHEME = "O3"
