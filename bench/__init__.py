"""Throughput and memory benchmarks: OpenELM against OLMo and against mlx-lm."""
