"""kvplane as a vLLM v1 KV connector."""
