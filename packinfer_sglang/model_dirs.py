"""Weightless model directories for ``--load-format dummy`` serving runs.

SGLang's ``--load-format dummy`` initialises random weights from ``config.json`` alone, so a model
directory only needs a config and a tokenizer::

    <model_dir>/config.json, generation_config.json
    <model_dir>/tokenizer/tokenizer.json, tokenizer_config.json, special_tokens_map.json

The tokenizer sits in its own folder, without a ``config.json``, on purpose: transformers 5 picks the
tokenizer class from ``config.json``'s ``model_type`` for some types (``qwen2`` among them, see
``MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS``), ignores ``tokenizer_class`` and rebuilds a byte-level
BPE that does not round-trip. Serve with ``--tokenizer-path <model_dir>/tokenizer`` and point the
benchmark client's ``--tokenizer`` there too; a server given only ``--model-path`` fails loudly
(no tokenizer) instead of tokenizing silently wrong.

The tokenizer is a ``tokenizers`` WordLevel vocabulary of ``vocab_size`` entries laid out as

    id 0: <unk>    id 1: <s> (bos)    id 2: </s> (eos)    id 3 + i: w<i>   for i in [0, vocab_size - 3)

with a Whitespace pre-tokenizer and no decoder (the ``tokenizers`` default decode joins tokens with
one space, i.e. the inverse of a whitespace split). Any id sequence therefore decodes to
space-separated words that re-encode to the same ids, one token per word: SGLang's
``generated-shared-prefix`` benchmark, which builds prompts by decoding random ids, gets prompts of
exactly the token lengths it asks for. A byte-level vocabulary without merges does not have this
property (random bytes re-encode to about twice the length).

No BOS or EOS is added on encode (no post-processor, ``add_bos_token: false``): a prompt of N
words is N tokens, and the text ``"\\n\\n"`` that the benchmark puts between system prompt and
question encodes to nothing.

Example::

    from pathlib import Path
    from packinfer_sglang.model_dirs import make_model_dir
    model_dir = make_model_dir("tiny", Path("out/models/tiny"))
    # python -m sglang.launch_server --model-path out/models/tiny --tokenizer-path out/models/tiny/tokenizer \
    #     --load-format dummy ...
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)
UNK_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID = 0, 1, 2
WORD_PREFIX = "w"
TOKENIZER_SUBDIR = "tokenizer"


def _transformers_version() -> str:
    """Installed transformers version, or "5.0.0" where it is absent.

    Recorded in ``config.json``: transformers >= 5 warns about a Mistral regex on local configs that
    lack it or name a version below 5.
    """
    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return "5.0.0"


@dataclass(frozen=True)
class ModelShape:
    """Architecture of a decoder-only model; sizes in elements, lengths in tokens."""

    architecture: str
    model_type: str
    hidden_size: int
    num_layers: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.num_qo_heads % self.num_kv_heads:
            raise ValueError(
                f"num_qo_heads={self.num_qo_heads} not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.vocab_size <= len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size={self.vocab_size} leaves no room for words after {SPECIAL_TOKENS}")


SHAPES: dict[str, ModelShape] = {
    "llama-3-8b": ModelShape(
        architecture="LlamaForCausalLM", model_type="llama", hidden_size=4096, num_layers=32,
        num_qo_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=14336, vocab_size=128256,
        max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
    ),
    "qwen2.5-7b": ModelShape(
        architecture="Qwen2ForCausalLM", model_type="qwen2", hidden_size=3584, num_layers=28,
        num_qo_heads=28, num_kv_heads=4, head_dim=128, intermediate_size=18944, vocab_size=152064,
        max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
    ),
    "tiny": ModelShape(
        architecture="LlamaForCausalLM", model_type="llama", hidden_size=256, num_layers=2,
        num_qo_heads=4, num_kv_heads=2, head_dim=64, intermediate_size=512, vocab_size=4096,
        max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
    ),
}


def get_shape(name: str) -> ModelShape:
    """Return the preset ``ModelShape`` called ``name``; raises ``KeyError`` listing the presets."""
    if name not in SHAPES:
        raise KeyError(f"unknown shape {name!r}; known: {sorted(SHAPES)}")
    return SHAPES[name]


def config_dict(shape: ModelShape) -> dict:
    """HuggingFace ``config.json`` contents for ``shape`` (legacy top-level ``rope_theta``)."""
    config = {
        "architectures": [shape.architecture],
        "model_type": shape.model_type,
        "hidden_size": shape.hidden_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_qo_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "intermediate_size": shape.intermediate_size,
        "vocab_size": shape.vocab_size,
        "max_position_embeddings": shape.max_position_embeddings,
        "rope_theta": shape.rope_theta,
        "rope_scaling": None,
        "rms_norm_eps": shape.rms_norm_eps,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": shape.dtype,
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "transformers_version": _transformers_version(),
    }
    if shape.model_type == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    if shape.model_type == "qwen2":  # Qwen2 always has q/k/v biases; no flag for it.
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=shape.num_layers)
    return config


def word_vocab(vocab_size: int) -> dict[str, int]:
    """Token -> id map: the special tokens at ids 0..2, then ``w0 … w<vocab_size - 4>``."""
    vocab = {token: token_id for token_id, token in enumerate(SPECIAL_TOKENS)}
    first_word_id = len(SPECIAL_TOKENS)
    for i in range(vocab_size - first_word_id):
        vocab[f"{WORD_PREFIX}{i}"] = first_word_id + i
    return vocab


def build_tokenizer(vocab_size: int) -> Tokenizer:
    """WordLevel tokenizer with ``vocab_size`` ids whose decode→encode round-trips exactly.

    Encoding splits on whitespace (and punctuation) and maps each word to one id, unknown words to
    ``<unk>``; decoding joins tokens with single spaces. No special tokens are added on encode.
    """
    tokenizer = Tokenizer(models.WordLevel(vocab=word_vocab(vocab_size), unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tokenizer


def tokenizer_config_dict(max_length: int) -> dict:
    """``tokenizer_config.json`` contents; ``max_length`` in tokens."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": UNK_TOKEN,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
    }


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def tokenizer_dir(model_dir: Path) -> Path:
    """The tokenizer folder of a directory written by ``make_model_dir``."""
    return Path(model_dir) / TOKENIZER_SUBDIR


def write_tokenizer(vocab_size: int, max_length: int, out_dir: Path) -> Path:
    """Write ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json`` to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer(vocab_size).save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config_dict(max_length))
    _write_json(
        out_dir / "special_tokens_map.json",
        {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": UNK_TOKEN},
    )
    return out_dir


def make_model_dir(shape: str, out_dir: Path) -> Path:
    """Write a weightless model directory for preset ``shape`` into ``out_dir`` and return it.

    Writes (overwriting) ``config.json`` and ``generation_config.json`` in ``out_dir`` and the
    tokenizer in ``tokenizer_dir(out_dir)`` (see the module docstring for why a subfolder). No
    weights: serve with ``--load-format dummy``. Raises ``KeyError`` for an unknown shape.
    """
    model_shape = get_shape(shape)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "config.json", config_dict(model_shape))
    _write_json(
        out_dir / "generation_config.json",
        {"bos_token_id": BOS_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID, "do_sample": False},
    )
    write_tokenizer(model_shape.vocab_size, model_shape.max_position_embeddings, tokenizer_dir(out_dir))
    return out_dir
