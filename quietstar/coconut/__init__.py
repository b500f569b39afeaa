"""Coconut: continuous thoughts (the last hidden state fed back as the next input embedding), trained by a curriculum."""
