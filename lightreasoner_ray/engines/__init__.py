"""Generation engines (the interface, Hugging Face, vLLM, the registry) and model loading. Ray-free."""
