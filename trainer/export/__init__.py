"""The Export step: adapter, merged 16-bit safetensors, GGUF and Ollama, each reloaded and verified against the
trained model before it is moved into place (`pipeline.export_run`)."""
