"""Lab tooling around a running federation: dashboard, figures, log tracing.

Not part of a node: nothing in kme, keyvault, routing, relay or gateway
imports it at run time.
"""
