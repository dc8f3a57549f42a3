"""The edge controller: sessions, rounds, batched verification and draft control.

Kept import-light: device agents import ``edge_controller.protocol`` from here, and must
not pull in torch.
"""
