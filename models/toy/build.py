"""Build the embedded toy: a pixel-space SD3-family model with a word-level CLIP text encoder.

The result is an ordinary diffusers folder (model_index.json + components) that ``SD3Policy`` loads
exactly as it loads SD3.5; only its size differs. ``launch/pretrain_toy.py`` trains it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIAL = ("<pad>", "<|startoftext|>", "<unk>", "<|endoftext|>")


def build_tokenizer(words: list[str], max_length: int):
    """A word-level tokenizer with CLIP's special tokens, as a transformers fast tokenizer.

    Word-level because the toy's vocabulary is a few dozen words; CLIP's BPE would only make the
    sequences longer. ids: 0 pad, 1 bos, 2 unk, 3 eos, then the words.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIAL, *sorted(set(words))])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", 1), ("<|endoftext|>", 3)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<pad>",
        unk_token="<unk>", model_max_length=max_length,
    )


def build_toy(
    words: list[str],
    image_size: int = 32,
    patch_size: int = 4,
    num_layers: int = 4,
    heads: int = 4,
    head_dim: int = 32,
    text_dim: int = 64,
    text_layers: int = 2,
    max_tokens: int = 16,
    seed: int = 0,
) -> dict:
    """Randomly initialised toy components: transformer, text_encoder, tokenizer, scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(words, max_tokens)
    text_encoder = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=2 * text_dim, num_hidden_layers=text_layers,
            num_attention_heads=2, max_position_embeddings=max_tokens, projection_dim=text_dim,
            pad_token_id=0, bos_token_id=1, eos_token_id=3,
        )
    )
    transformer = SD3Transformer2DModel(
        sample_size=image_size, patch_size=patch_size, in_channels=3, out_channels=3, num_layers=num_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=text_dim,
        caption_projection_dim=heads * head_dim, pooled_projection_dim=text_dim,
        pos_embed_max_size=image_size // patch_size,
    )
    # Flow matching with no resolution shift: at 32 px the signal survives high noise less well than
    # at 1024 px, so SD3's shift of 3 would waste steps at near-pure noise.
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return {"transformer": transformer, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def save_toy(components: dict, folder: str | Path, card: str | None = None) -> Path:
    """Write the components as a diffusers SD3 folder (absent slots are ``[null, null]``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": _diffusers_version()}
    for name in ("scheduler", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
                 "tokenizer_3", "transformer", "vae"):
        obj = components.get(name)
        if obj is None:
            index[name] = [None, None]
            continue
        library = "diffusers" if type(obj).__module__.startswith("diffusers") else "transformers"
        index[name] = [library, type(obj).__name__]
        obj.save_pretrained(folder / name)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    if card is not None:
        (folder / "README.md").write_text(card)
    return folder


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__
