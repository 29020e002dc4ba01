"""The umT5-XXL text encoder (``transformers.UMT5EncoderModel``) and its tokenizer."""

from __future__ import annotations

import html
import json
import os
import re
import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoTokenizer,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    UMT5Config,
    UMT5EncoderModel,
)

from ..errors import CheckpointError
from .weights import ConfigSource, empty_model, load_into, read_component, read_config

TEXT_LEN = 512  # tokens the official encoder truncates to (the DiT pads context to this length)
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")


def clean_prompt(text: str) -> str:
    """The official whitespace cleaning: unescape HTML twice, collapse runs of whitespace.

    (The official code also runs ftfy's mojibake repair first; it changes only broken text.)
    """
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer built in code, with T5's special ids (pad 0, eos 1, unk 2)."""
    specials = ["<pad>", "</s>", "<unk>"]
    pieces = specials + ["\u2581"] + list(string.ascii_letters + string.digits + string.punctuation)
    backend = Tokenizer(models.Unigram([(p, 0.0 if p in specials else -1.0) for p in pieces], unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


class TextEncoder:
    """umT5 encoder: prompts -> per-prompt embeddings [L_i, text_dim], L_i = real token count.

    Args:
        model: a ``UMT5EncoderModel`` (eval mode).
        tokenizer: its tokenizer; appends ``</s>`` like the official one.
        text_len: longest prompt in tokens; longer prompts are truncated, as officially.
    """

    def __init__(
        self,
        model: UMT5EncoderModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        text_len: int = TEXT_LEN,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.text_len = text_len

    @property
    def text_dim(self) -> int:
        return self.model.config.d_model

    @classmethod
    def tiny(cls, text_dim: int = 64, seed: int = 0) -> TextEncoder:
        """Toy umT5 (2 layers, 4 heads of 16) with seeded random weights and a code-built tokenizer."""
        tokenizer = tiny_tokenizer()
        config = UMT5Config(
            vocab_size=len(tokenizer),
            d_model=text_dim,
            d_kv=16,
            d_ff=2 * text_dim,
            num_layers=2,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            pad_token_id=0,
            eos_token_id=1,
        )
        with torch.random.fork_rng(devices=[]):  # seeded weights; the caller's RNG untouched
            torch.manual_seed(seed)
            return cls(UMT5EncoderModel(config).eval().requires_grad_(False), tokenizer)

    @classmethod
    def from_files(
        cls,
        path: str | os.PathLike,
        tokenizer: str | os.PathLike | PreTrainedTokenizerBase | None = None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        config: ConfigSource | None = None,
        quantization: str | None = None,
    ) -> TextEncoder:
        """Load umT5 weights: an HF folder / file, or the official Wan file (.pth or .safetensors).

        fp8 and scaled-fp8 files are dequantized to ``dtype``. ``tokenizer`` is the umT5
        tokenizer (a folder with ``spiece.model`` or ``tokenizer.json``, or a tokenizer object);
        it defaults to ``path`` when that folder holds tokenizer files. ``config`` overrides the
        shipped umT5-XXL architecture (a dict, config object or config.json).
        ``quantization`` (e.g. 'fp8_e4m3fn') stores the block Linears that way (:meth:`quantize`).
        """
        tok = _load_tokenizer(tokenizer if tokenizer is not None else path)
        state = read_component(path, "text", dtype)
        arch = UMT5Config.from_dict(read_config(config, path, "umt5-xxl.json"))
        model = load_into(
            empty_model(lambda: UMT5EncoderModel(arch)),
            state,
            device=device,
            what="umT5 encoder",
            source=path,
        )
        encoder = cls(model, tok)
        return encoder if quantization is None else encoder.quantize(quantization)

    def quantize(self, mode: str) -> TextEncoder:
        """Store the attention and gated-FFN input Linears of every block in ``mode`` (a
        :class:`~wanstudio.options.QuantMode` name; 'fp8_e4m3fn' halves them); returns self.

        The token embedding and each FFN's output projection ``wo`` stay in the base dtype:
        umT5 casts the FFN's hidden state to ``wo.weight.dtype`` before ``wo``, which an 8-bit
        weight would break. umT5-XXL in bf16: 11.4 GB; in fp8: 7.7 GB.
        """
        from ..quant import quantize

        quantize(self.model, mode, keep=(".wo",), only_under="encoder.block.")
        return self

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        """Prompts -> list of [L_i, text_dim] embeddings (model dtype and device).

        Padding is masked out of attention, and T5 positions are relative, so each prompt's
        embedding does not depend on what else is in the batch.
        """
        if isinstance(prompts, str):
            raise TypeError("TextEncoder.encode wants a list of prompts; got one str. Pass [prompt].")
        batch = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding=True,
            truncation=True,
            max_length=self.text_len,
            return_tensors="pt",
        )
        device = self.model.device
        mask = batch.attention_mask.to(device)
        hidden = self.model(input_ids=batch.input_ids.to(device), attention_mask=mask)
        lengths = mask.sum(dim=1).tolist()
        return [h[:n] for h, n in zip(hidden.last_hidden_state, lengths)]


def _load_tokenizer(source: str | os.PathLike | PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if isinstance(source, PreTrainedTokenizerBase):
        return source
    folder = Path(source)
    if not (folder.is_dir() and any((folder / name).is_file() for name in _TOKENIZER_FILES)):
        raise CheckpointError(
            f"no umT5 tokenizer in {folder}: expected a folder with spiece.model or "
            f"tokenizer.json. Pass tokenizer='path/to/umt5-xxl' (the google/umt5-xxl tokenizer "
            f"files; wanstudio never downloads them)."
        )
    _refuse_custom_code(folder)
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _refuse_custom_code(folder: Path) -> None:
    """Refuse a tokenizer folder whose config points at Python code shipped beside it.

    ``auto_map`` in ``tokenizer_config.json`` names classes in the folder's own .py files;
    transformers would ask for ``trust_remote_code=True``, which wanstudio never enables.
    """
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"{config} is not readable JSON ({err}); restore the tokenizer folder's original files."
        ) from err
    auto_map = data.get("auto_map") if isinstance(data, dict) else None
    if auto_map:
        classes = auto_map if isinstance(auto_map, str) else ", ".join(map(str, _flatten(auto_map)))
        raise CheckpointError(
            f"{folder}: the tokenizer needs custom Python code from its own folder (auto_map in "
            f"tokenizer_config.json: {classes}); wanstudio never runs code shipped with weights. "
            f"Use a tokenizer folder without custom code, e.g. the official google/umt5-xxl one "
            f"(in the Wan2.1 download: google/umt5-xxl/)."
        )


def _flatten(value) -> list:
    """The leaves of auto_map (a dict of class paths or lists of them)."""
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _flatten(v)]
    if isinstance(value, (list, tuple)):
        return [leaf for v in value for leaf in _flatten(v)]
    return [] if value is None else [value]
