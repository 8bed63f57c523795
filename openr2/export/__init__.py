"""Export to other runtimes: gguf.py (llama.cpp / Ollama, architecture deepseek2) with gguf_vocab.py."""
