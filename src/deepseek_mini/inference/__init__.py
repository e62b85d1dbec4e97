"""Using a trained model: generation (prefill and decode steps), sampling, streaming."""
