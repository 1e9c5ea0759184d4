"""Other model formats turned into Hugging Face checkpoints."""
