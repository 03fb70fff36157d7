"""Corpora in and out: reading jsonl, tokenizing, packing, fingerprints."""
