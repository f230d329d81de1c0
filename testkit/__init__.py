"""Test fixtures, apart from the serving code: a tiny RecurrentGemma checkpoint in the Kaggle
layout (:mod:`testkit.tiny_model`), a tiny sentencepiece tokenizer (:mod:`testkit.tiny_tokenizer`)
and a tiny detoxify checkpoint (:mod:`testkit.tiny_detoxify`). They go through the same loading
code as released checkpoints; ``rgbatch fixtures DIR`` writes them for ``make run-local``.
"""
