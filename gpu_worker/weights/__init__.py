"""Weight acquisition: the model store (registered names, fetch, cache) and the GGUF conversion."""
