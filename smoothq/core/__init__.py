"""core: what every layer stands on. Quantization schemes (schemes), INT8 quantization primitives
(quant), the run record a model carries (record), the recipe (recipe: the frozen config of a run
and its presets), argument checks (validate), output-directory rules (outputs), data sources
(data), model loading (models), token-window perplexity (perplexity: the measure the alpha search
and every evaluation use) and the command-line defaults (defaults).

May import: nothing else in smoothq.
"""
