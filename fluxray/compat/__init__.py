"""What other FLUX trainers write and read: ai-toolkit configs, kohya/ai-toolkit prompt flags."""
