"""The fast tier: pure-Python tests that need neither the model nor the compiled module.

``python -m pytest tests/unit`` runs it alone in seconds; the full suite collects it too.
(A package, so its module names never clash with the model tests' in ``tests/``.)
"""
