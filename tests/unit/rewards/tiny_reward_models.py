"""Tiny random checkpoints for the learned rewards, built from config and saved the way the real ones
ship (transformers folders, a LAION-style head state dict, reference images), so the rewards' real
loading code runs in tests. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

# Processor settings of the real checkpoints at 1/7 scale: CLIP resizes the short side to 224 and crops
# 224 (here 32/32); DINOv2 resizes to 256 and crops 224 (here 36/32).
CLIP_SIZE = 32
DINO_RESIZE, DINO_CROP = 36, 32
AESTHETIC_WIDTHS = (768, 1024, 128, 64, 16, 1)  # the published head


def save_tiny_clip(folder: Path, projection_dim: int = 16, seed: int = 0) -> Path:
    """A random CLIPModel (1 layer per tower, 16 wide, 8-px patches on 32-px images), its CLIP BPE
    tokenizer and a CLIPImageProcessor config, saved as a transformers folder."""
    from conftest import _tiny_clip_tokenizer
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    torch.manual_seed(seed)
    tokenizer = _tiny_clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        ),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=CLIP_SIZE, patch_size=8),
        projection_dim=projection_dim,
    )
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": CLIP_SIZE}, crop_size={"height": CLIP_SIZE, "width": CLIP_SIZE}).save_pretrained(folder)
    return Path(folder)


def aesthetic_mlp(widths=AESTHETIC_WIDTHS) -> nn.Sequential:
    """The LAION improved-aesthetic-predictor MLP as its repository defines it (`MLP.layers`)."""
    a, b, c, d, e, f = widths
    return nn.Sequential(
        nn.Linear(a, b), nn.Dropout(0.2), nn.Linear(b, c), nn.Dropout(0.2), nn.Linear(c, d), nn.Dropout(0.1),
        nn.Linear(d, e), nn.Linear(e, f),
    )


def save_aesthetic_head(file: Path, widths=AESTHETIC_WIDTHS, seed: int = 0) -> Path:
    """A random head saved like sac+logos+ava1-l14-linearMSE.pth (keys layers.N.*), or as safetensors."""
    torch.manual_seed(seed)
    state = {f"layers.{k}": v for k, v in aesthetic_mlp(widths).state_dict().items()}
    if Path(file).suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(file))
    else:
        torch.save(state, file)
    return Path(file)


def save_tiny_dino(folder: Path, seed: int = 0) -> Path:
    """A random Dinov2Model (1 layer, 16 wide, 8-px patches) and a BiT processor config like DINOv2's.

    initializer_range=0.5: at the default 0.02 the learned CLS token swamps the patches and every image's
    CLS feature has cosine > 0.99 with every other's, which would hide most bugs."""
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=DINO_CROP, patch_size=8,
        initializer_range=0.5,
    )
    Dinov2Model(config).save_pretrained(folder)
    BitImageProcessorPil(
        size={"shortest_edge": DINO_RESIZE}, crop_size={"height": DINO_CROP, "width": DINO_CROP},
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(folder)
    return Path(folder)


def save_reference_images(folder: Path, sizes=((32, 32), (40, 48), (50, 36)), seed: int = 0) -> list[Path]:
    """Random RGB PNGs of the given (height, width) in `folder`, named ref0.png, ref1.png, ..."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, (h, w) in enumerate(sizes):
        paths.append(folder / f"ref{i}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def random_uint8_images(batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    """float32 [B, 3, H, W] on the 8-bit grid (k / 255): what a processor sees after its uint8 round trip."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, height, width), generator=g).float() / 255


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] on the 8-bit grid -> B PIL RGB images, exactly."""
    arrays = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arrays]


# A chat template in the ChatML form most VLMs use; the image placeholder is LLaVA's "<image>".
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
YES_TOKENS, NO_TOKENS = ("yes", "Ġyes", "Yes", "ĠYes"), ("no", "Ġno", "No", "ĠNo")


def tiny_byte_level_tokenizer():
    """A byte-level BPE tokenizer (Qwen2's class) over the 256 byte symbols, with merges that make single
    tokens of yes/no (YES_TOKENS, NO_TOKENS; "Ġ" marks a leading space) and ChatML + "<image>" specials."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = [("e", "s"), ("y", "es"), ("Y", "es"), ("Ġ", "y"), ("Ġy", "es"), ("Ġ", "Y"), ("ĠY", "es"),
              ("n", "o"), ("N", "o"), ("Ġ", "n"), ("Ġn", "o"), ("Ġ", "N"), ("ĠN", "o")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
    for token in specials:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    return tokenizer


def save_tiny_llava(folder: Path, seed: int = 0) -> Path:
    """A random LlavaForConditionalGeneration (CLIP vision tower and Llama text model, 1 layer each,
    16 wide) with a LlavaProcessor (CLIP image processor at 32 px, the byte-level tokenizer, CHAT_TEMPLATE).
    Qwen2-VL cannot stand in here: its processor needs a video processor, which needs torchvision."""
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    torch.manual_seed(seed)
    tokenizer = tiny_byte_level_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<image>")}
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=CLIP_SIZE, patch_size=8),
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, bos_token_id=ids["<|endoftext|>"],
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        image_token_index=ids["<image>"], vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": CLIP_SIZE}, crop_size={"height": CLIP_SIZE, "width": CLIP_SIZE})
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE, patch_size=8,
                   vision_feature_select_strategy="default", image_token="<image>", num_additional_image_tokens=1).save_pretrained(folder)
    return Path(folder)


def tiny_bert_tokenizer_folder(folder: Path) -> Path:
    """A BERT WordPiece tokenizer (bert-base-uncased's special tokens, letters and a few words), saved."""
    import string

    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "cat", "photo", "of", "car", "two"]
    words += [c for c in string.ascii_lowercase if c not in words] + [f"##{c}" for c in string.ascii_lowercase]
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(folder)
    return Path(folder)


IMAGE_REWARD_DIMS = dict(vision_width=24, vision_heads=2, patch=8, image=32, text_width=16, text_heads=2, layers=2)


def random_image_reward_state(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict in ImageReward.pt's layout: BLIP's timm-style ViT under blip.visual_encoder,
    BLIP's BERT with cross-attention under blip.text_encoder (built here with transformers' BlipTextModel,
    whose names match BLIP's med.py), BLIP's ITC projections, and the MLP head under mlp.layers."""
    from transformers import BlipTextConfig, BlipTextModel

    d = IMAGE_REWARD_DIMS
    g = torch.Generator().manual_seed(seed)

    def t(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    w = d["vision_width"]
    grid = (d["image"] // d["patch"]) ** 2
    state = {"blip.visual_encoder.patch_embed.proj.weight": t(w, 3, d["patch"], d["patch"]), "blip.visual_encoder.patch_embed.proj.bias": t(w),
             "blip.visual_encoder.cls_token": t(1, 1, w), "blip.visual_encoder.pos_embed": t(1, grid + 1, w),
             "blip.visual_encoder.norm.weight": 1 + t(w, scale=0.1), "blip.visual_encoder.norm.bias": t(w, scale=0.1)}
    for i in range(d["layers"]):
        p = f"blip.visual_encoder.blocks.{i}."
        state |= {p + "norm1.weight": 1 + t(w, scale=0.1), p + "norm1.bias": t(w, scale=0.1), p + "attn.qkv.weight": t(3 * w, w),
                  p + "attn.qkv.bias": t(3 * w), p + "attn.proj.weight": t(w, w), p + "attn.proj.bias": t(w),
                  p + "norm2.weight": 1 + t(w, scale=0.1), p + "norm2.bias": t(w, scale=0.1), p + "mlp.fc1.weight": t(4 * w, w),
                  p + "mlp.fc1.bias": t(4 * w), p + "mlp.fc2.weight": t(w, 4 * w), p + "mlp.fc2.bias": t(w)}
    torch.manual_seed(seed)
    text = BlipTextModel(BlipTextConfig(
        vocab_size=vocab, hidden_size=d["text_width"], encoder_hidden_size=w, intermediate_size=2 * d["text_width"],
        num_hidden_layers=d["layers"], num_attention_heads=d["text_heads"], max_position_embeddings=40, initializer_range=0.2,
        pad_token_id=0, bos_token_id=None, sep_token_id=None, eos_token_id=None), add_pooling_layer=False)
    state |= {f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()}
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(40)[None]  # BLIP saves this buffer
    state |= {"blip.vision_proj.weight": t(8, w), "blip.vision_proj.bias": t(8), "blip.text_proj.weight": t(8, d["text_width"]),
              "blip.text_proj.bias": t(8)}
    head = aesthetic_mlp((d["text_width"], 32, 16, 8, 4, 1))
    state |= {f"mlp.layers.{k}": v for k, v in head.state_dict().items()}
    return state


def save_tiny_image_reward(root: Path, seed: int = 0) -> tuple[dict, Path]:
    """(the ImageReward-layout state dict, the folder rewards.image_reward_convert made of it), with
    ImageReward's preprocessing scaled to the tiny ViT's 32 px."""
    import json

    from transformers import AutoTokenizer

    from rewards.image_reward_convert import main

    root = Path(root)
    tokenizer = tiny_bert_tokenizer_folder(root / "bert")
    vocab = len(AutoTokenizer.from_pretrained(tokenizer)) + 2  # + [DEC], [ENC], as in ImageReward's 30522 + 2
    state = random_image_reward_state(vocab, seed)
    torch.save(state, root / "ImageReward.pt")
    out = root / "image_reward"
    main([str(root / "ImageReward.pt"), "--tokenizer", str(tokenizer), "--out", str(out),
          "--vision-heads", str(IMAGE_REWARD_DIMS["vision_heads"]), "--text-heads", str(IMAGE_REWARD_DIMS["text_heads"])])
    config = json.loads((out / "preprocessor_config.json").read_text())
    config["size"], config["crop_size"] = {"shortest_edge": 32}, {"height": 32, "width": 32}
    (out / "preprocessor_config.json").write_text(json.dumps(config))
    return state, out
