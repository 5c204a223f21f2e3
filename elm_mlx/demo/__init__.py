"""The demo model bundled with elm-mlx: a small OpenELM trained on Shakespeare.

It ships as Apple ships OpenELM (a Hugging Face PyTorch-layout checkpoint),
so its first use runs through the converter like Apple's own models do.
`python -m elm_mlx.demo.build` retrains it from scratch. Beside it ships a
1M-parameter draft with the same tokenizer (`--draft`), so that speculative
decoding with a draft model has an honest pair to measure offline.
"""

from pathlib import Path

DEMO_NAME = "OpenELM-Shakespeare"
DEMO_DIR = Path(__file__).resolve().parent / DEMO_NAME
DRAFT_NAME = "OpenELM-Shakespeare-draft"
DRAFT_DIR = Path(__file__).resolve().parent / DRAFT_NAME


def demo_notice() -> str:
    return (
        f"using the bundled demo model {DEMO_NAME} (a 4M-parameter OpenELM trained on Shakespeare, see {DEMO_DIR / 'README.md'}); "
        "for Apple's models pass e.g. --model apple/OpenELM-270M-Instruct"
    )
