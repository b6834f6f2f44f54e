"""lmssl's benchmark, a tool with its own CLI: `python -m lmssl.bench` (see __main__.py).

Nothing is imported here, so `import lmssl.bench.parts` costs no more than its own imports, and
the PyTorch peer (hf_peer.py, which imports torch at the top) loads only when asked for.
"""
