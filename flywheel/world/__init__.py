"""The offline tiny world: tasks, corpora, tokenizer, model sizes, the pre-anneal base."""
