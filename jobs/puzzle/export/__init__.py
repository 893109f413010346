"""Exports of a saved child into other engines' own file formats (``puzzle export ...``).

``puzzle.export.gguf``: the GGUF file llama.cpp loads (architecture ``deci``). Each exporter reads a
nemotron-nas directory written by ``puzzle.model.save_pretrained`` and imports its engine's format
library only here, so the model package that every pod imports stays free of it.
"""
