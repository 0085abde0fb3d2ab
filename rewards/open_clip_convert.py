"""Convert an open_clip CLIP checkpoint (e.g. HPS v2's) into a transformers CLIPModel folder.

HPS v2 / v2.1 (xswu/HPSv2: HPS_v2_compressed.pt, HPS_v2.1_compressed.pt) are open_clip ViT-H-14
fine-tunes. open_clip itself needs torchvision and timm, which this project avoids, so instead of
loading it the weights are renamed once into transformers' CLIPModel layout and the reward loads
that folder like any other CLIP (rewards/clip_score.py):

    python -m rewards.open_clip_convert /models/HPS_v2.1_compressed.pt \
        --like /models/CLIP-ViT-H-14-laion2B-s32B-b79K --out /models/HPSv2.1

`--like` is a transformers folder of the same architecture (for HPS: laion/CLIP-ViT-H-14-laion2B-s32B-b79K,
the model HPS was fine-tuned from; its *.json and *.txt files are enough): its config.json gives the
architecture (including the activation: GELU for LAION's ViT-H, quick-GELU for OpenAI's models), and
its tokenizer and preprocessor_config.json are copied to `--out`. Only the classic CLIP layout is
handled (class-token pooling, no layer scale, attention pooling or projection bias); anything else in
the checkpoint is an error, never silently dropped.
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

import torch

# open_clip key suffix inside a residual block -> transformers' CLIPEncoderLayer key suffix.
BLOCK = {
    "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight", "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
}
# Keys outside the blocks. Projections are matrices applied as x @ P in open_clip, Linear weights (P^T) here.
SINGLE = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight", "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight", "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight", "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
# Buffers some open_clip versions saved (the causal mask is rebuilt by transformers).
IGNORED = {"attn_mask"}
RESBLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")


def convert_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPModel state dict from an open_clip CLIP state dict (or a training checkpoint
    holding one under "state_dict", keys optionally prefixed "module."). ValueError listing every key
    that has no counterpart."""
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k.removeprefix("module."): v for k, v in state.items()}
    out, unknown = {}, []
    for key, value in state.items():
        if key in IGNORED:
            continue
        if key in SINGLE:
            out[SINGLE[key]] = value
        elif key in TRANSPOSED:
            out[TRANSPOSED[key]] = value.T.contiguous()
        elif (m := RESBLOCK.match(key)) is not None:
            tower = "vision_model" if m[1] else "text_model"
            prefix, rest = f"{tower}.encoder.layers.{m[2]}.", m[3]
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                # nn.MultiheadAttention packs q, k, v along dim 0, in that order.
                kind = "weight" if rest.endswith("weight") else "bias"
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{name}.{kind}"] = part.contiguous()
            elif rest in BLOCK:
                out[prefix + BLOCK[rest]] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"{len(unknown)} open_clip keys have no transformers CLIPModel counterpart (not a classic CLIP layout?): "
            f"{sorted(unknown)[:10]}"
        )
    return out


def convert(checkpoint: Path, like: Path, out: Path) -> None:
    """Write a transformers CLIP folder to `out`: the architecture and processor files of `like`, the
    weights of the open_clip `checkpoint`. Loads strictly, so a shape or key mismatch with `like`'s
    architecture is an error naming the keys."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    state = convert_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    model = CLIPModel(CLIPConfig.from_pretrained(like))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{checkpoint} does not fit the architecture of {like}: missing {missing[:10]}, unexpected {unexpected[:10]}")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(like, local_files_only=True).save_pretrained(out)
    shutil.copy(Path(like) / "preprocessor_config.json", Path(out) / "preprocessor_config.json")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="open_clip state dict (.pt), e.g. HPS_v2.1_compressed.pt")
    parser.add_argument("--like", type=Path, required=True, help="transformers folder of the same architecture (config, tokenizer, processor)")
    parser.add_argument("--out", type=Path, required=True, help="folder to write")
    args = parser.parse_args(argv)
    for path, flag in ((args.checkpoint, "checkpoint"), (args.like / "config.json", "--like"), (args.like / "preprocessor_config.json", "--like")):
        if not path.exists():
            parser.error(f"{flag}: {path} does not exist")
    convert(args.checkpoint, args.like, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
