"""Data: document readers (sources.py), the byte-level BPE tokenizer
(tokenizer.py), the tokenize-once cache (cache.py) and the packing and Grain
pipeline (pipeline.py)."""
