"""Training of the embedded default model: a small LLaVA on generated scenes."""
