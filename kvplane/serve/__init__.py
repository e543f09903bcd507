"""The reference OpenAI-compatible server: a Llama over paged KV caches with kvplane inside."""
