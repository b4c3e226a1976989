"""data — corpus preparation: read raw corpora, clean, align, split, write plain parallel files + a manifest.

Knows nothing of models; `nmt` never imports it (only the command line dispatches here).
"""
