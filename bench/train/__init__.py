"""``python -m bench.train``: a small byte-level language model trained with the library's MoE layers.

A decoder-only transformer whose FFN blocks are ``bsm.dMoE`` (dropless), ``bsm.PaddedMoE`` at capacity factors
(GShard-style token dropping) or a dense SwiGLU FFN with the same active parameters, trained on CPython's own
documentation topics (``pydoc_data.topics``: real English prose on every machine, no download). Reports the
validation loss per step and per second, dropped tokens and expert load per layer, tokens/s and the bytes saved
for backward per token; writes markdown, CSV, JSON and PNG plots.

Modules: ``data`` (corpus, split, batches), ``model`` (the LM and its FFN variants), ``loop`` (training,
evaluation, routing statistics, checkpoints), ``outputs`` (files and plots), ``cli`` (presets, arguments).
"""
