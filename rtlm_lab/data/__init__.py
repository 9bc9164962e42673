"""Corpus and asset preparation: CCC requests, WordNet, GGUF model files."""
