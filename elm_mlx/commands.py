"""`elm-mlx COMMAND ...`: one entry point for every tool in the package.

Each command is the module that `python -m` also runs; this only picks it by
name, so both forms take the same options and behave the same.
"""

import importlib
import sys
from typing import List, Optional

from . import cli

# name -> (module with main(argv), what it does); in the order a newcomer meets them
COMMANDS = {
    "generate": ("elm_mlx.generate", "generate text from a prompt"),
    "chat": ("elm_mlx.chat", "chat in the terminal, multi-turn"),
    "cache-prompt": ("elm_mlx.cache_prompt", "save a prompt's keys and values for generate --prompt-cache-file"),
    "serve": ("elm_mlx.server", "serve an OpenAI-compatible HTTP API"),
    "convert": ("convert.__main__", "convert a PyTorch OpenELM checkpoint to an MLX model directory"),
    "lora": ("elm_mlx.lora.cli", "fine-tune: LoRA, DoRA, QLoRA or all weights"),
    "fuse": ("elm_mlx.fuse", "merge fine-tuned adapters into a new model directory"),
    "evaluate": ("elm_mlx.evaluate.cli", "perplexity and benchmark accuracy"),
    "bench": ("bench.__main__", "measure throughput and memory against OLMo and mlx-lm"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return (
        "usage: elm-mlx COMMAND [options]\n\n"
        "Run, convert, fine-tune and serve Apple's OpenELM models on MLX.\n"
        "Without --model, commands use the bundled Shakespeare demo model.\n\n"
        "commands:\n" + "\n".join(lines) + "\n\n"
        "`elm-mlx COMMAND --help` describes a command's options.\n"
    )


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(usage())
        sys.exit(0 if argv else 2)
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"elm-mlx {__version__}")
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        sys.exit(f"elm-mlx: error: unknown command {cli.one_line(name, 80)!r}{hint}; commands: {', '.join(COMMANDS)}")
    cli.invoked_as = f"elm-mlx {name}"
    module = importlib.import_module(COMMANDS[name][0])
    module.main(rest)


def run() -> None:
    """The console script: errors as one line, like `python -m` (see cli.run_cli)."""
    cli.run_cli(main)
