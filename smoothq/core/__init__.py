"""core: what every layer stands on. Quantization schemes (schemes), INT8 quantization primitives
(quant), the run record a model carries (record), the recipe (recipe: the frozen config of a run,
its presets and the alpha search's settings), argument checks (validate), output-directory rules
(outputs: temp directory then rename, what may be replaced), data sources (data), model loading
(models), running a model over samples without logits (forward), token-window perplexity
(perplexity: the measure the alpha search and every evaluation use), the one table renderer
(tables) and the defaults every subcommand and function share (defaults).

May import: nothing else in smoothq.
"""
