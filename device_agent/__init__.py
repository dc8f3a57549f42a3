"""The device agent: drafts with a small model (llama.cpp, or ONNX Runtime), talks to the
edge controller.

Installed on boards with ``pip install .[device]`` (``.[device,onnx]`` for ONNX drafts):
nothing here imports torch.
"""
