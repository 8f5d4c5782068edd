"""The key vault service: the only place a KMSTN keeps keys at rest.

``keyvault.client`` is what the other services import; the process is
``python -m keyvault`` (``kmstn-keyvault``).
"""
