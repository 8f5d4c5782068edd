"""Lab tooling around a kmstn federation: SAE-side helpers, not part of the node core."""
