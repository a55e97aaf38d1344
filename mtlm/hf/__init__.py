"""Single-task export to a standalone Hugging Face folder (`mtlm export RUN --task NAME --format hf`)."""
