"""Write a weightless model directory (config + word-level tokenizer) for ``--load-format dummy``.

    python -m scripts.make_model_dir --shape llama-3-8b --out out/models/llama-3-8b

Serve it with ``--model-path out/models/llama-3-8b --tokenizer-path out/models/llama-3-8b/tokenizer
--load-format dummy``; ``packinfer_sglang.model_dirs`` explains the layout.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from packinfer_sglang.model_dirs import SHAPES, config_dict, make_model_dir, tokenizer_dir


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags of this script."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", required=True, choices=sorted(SHAPES), help="model shape preset to write")
    parser.add_argument("--out", required=True, type=Path,
                        help="model directory to create (overwrites its files)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    model_dir = make_model_dir(args.shape, args.out)
    config = config_dict(SHAPES[args.shape])
    print(
        f"wrote {model_dir} ({config['architectures'][0]}, {config['num_hidden_layers']} layers, "
        f"hidden {config['hidden_size']}, vocab {config['vocab_size']});"
        f" tokenizer in {tokenizer_dir(model_dir)}"
    )


if __name__ == "__main__":
    main()
