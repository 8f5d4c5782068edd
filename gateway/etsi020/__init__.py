"""ETSI GS QKD 020 V1.1.1 horizontal API (KMSTN <-> KMSTN, KMSTN <-> foreign KMS)."""
