"""Evaluation: perplexity of a model on a text (perplexity.py), and of its quantized variants side by side
(compare.py); `elm-mlx evaluate` (cli.py) runs both."""
