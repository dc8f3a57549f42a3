"""The device agent: drafts with a small llama.cpp model, talks to the edge controller.

Installed on boards with ``pip install .[device]``: nothing here imports torch.
"""
