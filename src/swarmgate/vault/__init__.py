"""The BYOK key vault: developers' own upstream API keys, encrypted at rest."""
