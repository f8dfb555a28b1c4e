"""Node backends: ``llama-cpp`` (in-process), ``openai-http`` (a local server) and ``sim``."""
