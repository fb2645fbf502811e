"""The validation suites, installed as ``pytest_llmopt.suites``: ``pytest --pyargs pytest_llmopt.suites``
(or ``llmopt run``) runs them from any directory; ``pytest suites`` runs them in a clone of the repository."""
