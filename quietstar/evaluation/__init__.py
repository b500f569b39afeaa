"""Evaluation: zero-shot GSM8K/CommonsenseQA, held-out perplexity and its reports."""
