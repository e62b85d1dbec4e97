"""The HTTP server: an OpenAI-style API and a story page over the batching engine."""
