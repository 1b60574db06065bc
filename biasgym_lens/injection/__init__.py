"""BiasInject: what a bias is (the catalogue), how it is measured in logits, and training a fresh token's input embedding on it (the ``Injection`` artifact)."""
