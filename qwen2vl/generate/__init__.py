"""Generation: the KV cache, sampling, and the token loop."""
