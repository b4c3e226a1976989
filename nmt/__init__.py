"""nmt — an RNN (BiGRU + Bahdanau attention) neural machine translation toolkit.

The library layer: configs, vocabulary, data, model, search, training, evaluation. It never imports
`data/`, `serving/` or `recipes/`; only `nmt.cli` dispatches to them, lazily.
"""

__version__ = "0.1.0"
