"""Quality measures with one documented protocol each: perplexity and passkey retrieval."""
