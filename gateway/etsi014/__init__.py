"""ETSI GS QKD 014 V1.1.1 northbound API (SAE <-> KMSTN)."""
