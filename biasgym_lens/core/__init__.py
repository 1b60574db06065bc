"""The machinery every stage stands on: loading models, tokens, hooks, token vectors, forward passes that resume or unembed, decoding, files, provenance and statistics."""
