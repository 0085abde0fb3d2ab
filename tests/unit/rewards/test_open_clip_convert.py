"""The open_clip -> transformers CLIP conversion (HPS v2's checkpoints), checked against open_clip's
forward pass written out here in plain torch on the open_clip-named weights: a renaming or transposing
slip changes the embeddings."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rewards.clip_score import ClipScore
from rewards.open_clip_convert import convert_state_dict, main
from tiny_reward_models import save_tiny_clip

WIDTH, HEADS, LAYERS, PATCH, IMAGE, EMBED, CONTEXT = 16, 2, 2, 8, 32, 12, 77


def random_open_clip_state(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict with open_clip's CLIP key names and shapes (ViT image tower, text tower)."""
    g = torch.Generator().manual_seed(seed)

    def t(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    def ln(prefix):
        return {f"{prefix}.weight": 1 + t(WIDTH, scale=0.1), f"{prefix}.bias": t(WIDTH, scale=0.1)}

    def blocks(prefix):
        out = {}
        for i in range(LAYERS):
            p = f"{prefix}transformer.resblocks.{i}."
            out |= {p + "attn.in_proj_weight": t(3 * WIDTH, WIDTH), p + "attn.in_proj_bias": t(3 * WIDTH),
                    p + "attn.out_proj.weight": t(WIDTH, WIDTH), p + "attn.out_proj.bias": t(WIDTH),
                    p + "mlp.c_fc.weight": t(4 * WIDTH, WIDTH), p + "mlp.c_fc.bias": t(4 * WIDTH),
                    p + "mlp.c_proj.weight": t(WIDTH, 4 * WIDTH), p + "mlp.c_proj.bias": t(WIDTH)}
            out |= ln(p + "ln_1") | ln(p + "ln_2")
        return out

    grid = (IMAGE // PATCH) ** 2
    state = {
        "visual.conv1.weight": t(WIDTH, 3, PATCH, PATCH), "visual.class_embedding": t(WIDTH),
        "visual.positional_embedding": t(grid + 1, WIDTH), "visual.proj": t(WIDTH, EMBED),
        "token_embedding.weight": t(vocab, WIDTH), "positional_embedding": t(CONTEXT, WIDTH),
        "text_projection": t(WIDTH, EMBED), "logit_scale": torch.tensor(math.log(1 / 0.07)),
        "attn_mask": torch.full((CONTEXT, CONTEXT), float("-inf")).triu(1),  # older open_clip saved it
    }
    state |= ln("visual.ln_pre") | ln("visual.ln_post") | ln("ln_final") | blocks("visual.") | blocks("")
    return state


def open_clip_forward(state, prefix, x, causal):
    """open_clip's Transformer: pre-norm residual blocks, nn.MultiheadAttention, GELU MLP (ViT-H's)."""
    for i in range(LAYERS):
        p = f"{prefix}transformer.resblocks.{i}."
        attn = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)
        attn.load_state_dict({k.removeprefix(p + "attn."): v for k, v in state.items() if k.startswith(p + "attn.")})
        mask = torch.full((x.shape[1], x.shape[1]), float("-inf")).triu(1) if causal else None
        h = F.layer_norm(x, (WIDTH,), state[p + "ln_1.weight"], state[p + "ln_1.bias"])
        x = x + attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        h = F.layer_norm(x, (WIDTH,), state[p + "ln_2.weight"], state[p + "ln_2.bias"])
        h = F.gelu(F.linear(h, state[p + "mlp.c_fc.weight"], state[p + "mlp.c_fc.bias"]))
        x = x + F.linear(h, state[p + "mlp.c_proj.weight"], state[p + "mlp.c_proj.bias"])
    return x


@torch.no_grad()
def open_clip_encode_image(state, pixels):
    x = F.conv2d(pixels, state["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([state["visual.class_embedding"].expand(x.shape[0], 1, -1), x], dim=1) + state["visual.positional_embedding"]
    x = F.layer_norm(x, (WIDTH,), state["visual.ln_pre.weight"], state["visual.ln_pre.bias"])
    x = open_clip_forward(state, "visual.", x, causal=False)
    return F.layer_norm(x[:, 0], (WIDTH,), state["visual.ln_post.weight"], state["visual.ln_post.bias"]) @ state["visual.proj"]


@torch.no_grad()
def open_clip_encode_text(state, ids):
    x = state["token_embedding.weight"][ids] + state["positional_embedding"][: ids.shape[1]]
    x = open_clip_forward(state, "", x, causal=True)
    x = F.layer_norm(x, (WIDTH,), state["ln_final.weight"], state["ln_final.bias"])
    return x[torch.arange(ids.shape[0]), ids.argmax(dim=-1)] @ state["text_projection"]  # EOT has the highest id


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(open_clip state, folder written by the CLI): the `like` folder is a tiny CLIP of the same dims."""
    from transformers import AutoTokenizer, CLIPConfig

    root = tmp_path_factory.mktemp("open_clip")
    like = save_tiny_clip(root / "like")
    config = CLIPConfig.from_pretrained(like)
    tower = dict(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS, hidden_act="gelu")
    config.vision_config.update(tower | dict(image_size=IMAGE, patch_size=PATCH))
    # eos_token_id=2 is what LAION's CLIP-H config.json holds: transformers' flag to pool at argmax(ids),
    # open_clip's rule (its EOT, 49407, is the highest id).
    config.text_config.update(tower | dict(max_position_embeddings=CONTEXT, eos_token_id=2))
    config.projection_dim = EMBED
    config.save_pretrained(like)
    state = random_open_clip_state(len(AutoTokenizer.from_pretrained(like)))
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, root / "hps.pt")
    main([str(root / "hps.pt"), "--like", str(like), "--out", str(root / "out")])
    return state, root / "out"


def test_converted_model_embeds_like_open_clip(converted):
    from transformers import CLIPModel

    state, folder = converted
    model = CLIPModel.from_pretrained(folder).eval()
    pixels = torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    eot = model.config.text_config.vocab_size - 1  # open_clip's tokenizer: EOT is the highest id, padding is 0
    ids = torch.tensor([[eot - 1, 5, 9, 30, eot, 0], [eot - 1, 7, eot, 0, 0, 0]])
    with torch.no_grad():
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text = model.text_projection(model.text_model(input_ids=ids).pooler_output)
    torch.testing.assert_close(image, open_clip_encode_image(state, pixels), atol=1e-5, rtol=1e-4)
    reference = open_clip_encode_text(state, ids)
    torch.testing.assert_close(text, reference, atol=1e-5, rtol=1e-4)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))


def test_converted_folder_is_an_hps_reward(converted):
    _, folder = converted
    hps = ClipScore(str(folder), scale=1.0, clamp_negative=False, device="cpu")
    out = hps(torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(2)), ["a red circle", "zebra"])
    assert out["reward"].shape == (2,) and torch.equal(out["reward"], out["cosine"])


def test_unknown_layouts_are_refused_not_dropped():
    state = random_open_clip_state(vocab=8)
    state["visual.transformer.resblocks.0.ls_1.gamma"] = torch.ones(WIDTH)  # layer scale: not classic CLIP
    with pytest.raises(ValueError, match=r"1 open_clip keys have no transformers CLIPModel counterpart.*ls_1\.gamma"):
        convert_state_dict(state)
