"""Measurements under any hooks: the bias elicited on groups, whether an injection took, general capability, standard benchmarks and generated paragraphs."""
