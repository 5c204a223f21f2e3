"""Evaluation: perplexity of a model on a text (perplexity.py), of its quantized variants side by side
(compare.py), and accuracy on lm-evaluation-harness tasks (lm_eval_backend.py, needs the [eval] extra);
`elm-mlx evaluate` (cli.py) runs all three."""
