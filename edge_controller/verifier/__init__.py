"""Batched verification of every device's draft by the target (docs/verifier.md).

``sampling`` (the lossless rules, pure torch), ``engine`` (``Verifier``: KV slots and one
forward per round), ``cost`` (the measured T_v model; numpy only). Nothing is imported
here, so ``edge_controller.verifier.cost`` stays free of torch.
"""
