"""Retrieval datastores: a corpus tokenized with the target's tokenizer and indexed by suffix (index.py)."""
