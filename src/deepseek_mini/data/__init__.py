"""Text to tokens: the tokenizer, the sources of documents, the token cache and batches."""
