"""Evaluations and benchmarks: perplexity, needle retrieval, R² analysis, speed and memory."""
