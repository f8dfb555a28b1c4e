"""Device trust: scores, suspicions, known-answer canaries and integrity attestations."""
