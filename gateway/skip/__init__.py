"""SKIP (draft-cisco-skip-02) on the ETSI 014 listener: the same keys, a second API."""
