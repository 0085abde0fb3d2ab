"""Convert THUDM's ImageReward.pt (BLIP + MLP head) into transformers folders for rewards/image_reward.py.

ImageReward (Xu et al. 2023) ships one state dict in BLIP's original layout: a timm-style ViT-L/16
("blip.visual_encoder.*"), BLIP's BERT text encoder with cross-attention ("blip.text_encoder.*", the
layout transformers' BlipTextModel was written to match) and the LAION-style MLP head ("mlp.layers.*").
The ImageReward package needs timm and fairscale (timm needs torchvision), so the weights are renamed
once instead:

    python -m rewards.image_reward_convert /models/ImageReward.pt \
        --tokenizer /models/bert-base-uncased --out /models/ImageReward-v1.0

writes OUT/vision (BlipVisionModel), OUT/text (BlipTextModel with cross-attention, no pooler),
OUT/head.safetensors, OUT/preprocessor_config.json (ImageReward's 224-px bicubic resize + center crop
with CLIP's mean/std) and the tokenizer (bert-base-uncased plus the [DEC] and [ENC] tokens BLIP adds).
Layer widths and counts are read from the checkpoint; head counts cannot be, so they are flags
(ImageReward's ViT-L: 16, BERT-base: 12). Keys the reward does not use (BLIP's ITC projections) are
listed when dropped; any other key is an error.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

VISION_SINGLE = {
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight", "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
    "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias",
}
VISION_BLOCK = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection",
                "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
UNUSED = ("blip.vision_proj.", "blip.text_proj.")  # BLIP's contrastive projections: ImageReward scores without them
# Saved by BLIP's BertEmbeddings as a persistent buffer; transformers rebuilds it.
IGNORED = {"blip.text_encoder.embeddings.position_ids"}
BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")
# ImageReward's image transform: Resize(224, bicubic) on the short side, CenterCrop(224), CLIP's statistics.
PREPROCESSOR = {
    "do_resize": True, "size": {"shortest_edge": 224}, "resample": 3, "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224}, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
}


def split_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict, dict, dict, list[str]]:
    """(BlipVisionModel state, BlipTextModel state, head state with keys layers.N.*, dropped keys) from
    ImageReward's state dict. ValueError listing every key it cannot place."""
    vision, text, head, dropped, unknown = {}, {}, {}, [], []
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            rest = key.removeprefix("blip.visual_encoder.")
            if rest in VISION_SINGLE:
                vision[VISION_SINGLE[rest]] = value
            elif (m := BLOCK_KEY.match(rest)) is not None and m[2] in VISION_BLOCK:
                vision[f"encoder.layers.{m[1]}.{VISION_BLOCK[m[2]]}.{m[3]}"] = value
            else:
                unknown.append(key)
        elif key in IGNORED:
            continue
        elif key.startswith("blip.text_encoder."):
            text[key.removeprefix("blip.text_encoder.")] = value  # same names in transformers' BlipTextModel
        elif key.startswith("mlp.layers."):
            head[key.removeprefix("mlp.")] = value
        elif key.startswith(UNUSED):
            dropped.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{len(unknown)} keys do not belong to ImageReward's BLIP + MLP layout: {sorted(unknown)[:10]}")
    return vision, text, head, dropped


def configs(vision: dict, text: dict, vision_heads: int, text_heads: int, tokenizer) -> tuple:
    """(BlipVisionConfig, BlipTextConfig) with every size read from the weights."""
    from transformers import BlipTextConfig, BlipVisionConfig

    width = vision["embeddings.class_embedding"].shape[-1]
    patch = vision["embeddings.patch_embedding.weight"].shape[-1]
    grid = round((vision["embeddings.position_embedding"].shape[1] - 1) ** 0.5)
    vision_config = BlipVisionConfig(
        hidden_size=width, intermediate_size=vision["encoder.layers.0.mlp.fc1.weight"].shape[0], patch_size=patch,
        image_size=grid * patch, num_hidden_layers=1 + max(int(k.split(".")[2]) for k in vision if k.startswith("encoder.layers.")),
        num_attention_heads=vision_heads, hidden_act="gelu", layer_norm_eps=1e-6,  # BLIP's ViT: LayerNorm(eps=1e-6), exact GELU
    )
    text_config = BlipTextConfig(
        vocab_size=text["embeddings.word_embeddings.weight"].shape[0], hidden_size=text["embeddings.word_embeddings.weight"].shape[1],
        max_position_embeddings=text["embeddings.position_embeddings.weight"].shape[0],
        encoder_hidden_size=text["encoder.layer.0.crossattention.self.key.weight"].shape[1],
        intermediate_size=text["encoder.layer.0.intermediate.dense.weight"].shape[0],
        num_hidden_layers=1 + max(int(k.split(".")[2]) for k in text if k.startswith("encoder.layer.")),
        num_attention_heads=text_heads, layer_norm_eps=1e-12, hidden_act="gelu",
        # is_decoder builds the cross-attention layers; the reward calls the encoder bidirectionally.
        is_decoder=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )
    return vision_config, text_config


def load_strictly(model, state: dict, what: str):
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{what}: missing {missing[:10]}, unexpected {unexpected[:10]}")
    return model


def convert(checkpoint: Path, tokenizer_path: Path, out: Path, vision_heads: int = 16, text_heads: int = 12) -> list[str]:
    """Write the folders described in the module docstring; returns the dropped keys."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, BlipTextModel, BlipVisionModel

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    vision, text, head, dropped = split_state_dict(state.get("state_dict", state))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
    # As BLIP's init_tokenizer: these two rows exist in the checkpoint's embedding (30522 + 2).
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    rows = text["embeddings.word_embeddings.weight"].shape[0]
    if len(tokenizer) != rows:
        raise ValueError(f"the tokenizer in {tokenizer_path} has {len(tokenizer)} tokens with [DEC] and [ENC] added, but the "
                         f"checkpoint's word embedding has {rows} rows: use the tokenizer the model was trained with")
    vision_config, text_config = configs(vision, text, vision_heads, text_heads, tokenizer)
    out = Path(out)
    load_strictly(BlipVisionModel(vision_config), vision, "vision tower").save_pretrained(out / "vision")
    load_strictly(BlipTextModel(text_config, add_pooling_layer=False), text, "text encoder").save_pretrained(out / "text")
    save_file({k: v.contiguous() for k, v in head.items()}, str(out / "head.safetensors"))
    tokenizer.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    return dropped


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="ImageReward.pt")
    parser.add_argument("--tokenizer", type=Path, required=True, help="bert-base-uncased folder (vocab.txt, tokenizer_config.json)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--vision-heads", type=int, default=16, help="attention heads of the ViT (ViT-L: 16)")
    parser.add_argument("--text-heads", type=int, default=12, help="attention heads of the BERT encoder (base: 12)")
    args = parser.parse_args(argv)
    for path, flag in ((args.checkpoint, "checkpoint"), (args.tokenizer, "--tokenizer")):
        if not path.exists():
            parser.error(f"{flag}: {path} does not exist")
    dropped = convert(args.checkpoint, args.tokenizer, args.out, args.vision_heads, args.text_heads)
    print(f"wrote {args.out}" + (f"; dropped {len(dropped)} unused keys: {sorted(dropped)}" if dropped else ""))


if __name__ == "__main__":
    main()
