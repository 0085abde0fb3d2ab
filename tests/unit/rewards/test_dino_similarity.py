"""DinoSimilarity on a tiny random Dinov2Model saved as a transformers folder with DINOv2-style
preprocessing (resize the short side, center-crop), against transformers' own model and processor."""

import pytest
import torch
from transformers import BitImageProcessorPil, Dinov2Model

from rewards.dino_similarity import DinoSimilarity, load_image
from tiny_reward_models import random_uint8_images, save_reference_images, save_tiny_dino, to_pil

# Every image here, references included, has a short side of 36 px, the processor's resize target, so no
# path resamples (PIL returns a copy on a same-size resize) and the scores must agree to float precision.
# The resize itself is checked against PIL in test_image_preprocess.py.
REF_SIZES = ((36, 36), (36, 48), (50, 36))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dino")
    return {"model": save_tiny_dino(root / "model"), "refs": root / "refs", "paths": save_reference_images(root / "refs", REF_SIZES)}


@pytest.fixture(scope="module")
def dino(dirs):
    return DinoSimilarity(str(dirs["model"]), references=str(dirs["refs"]), device="cpu")


def transformers_features(folder, pil_images, pooling="cls") -> torch.Tensor:
    model = Dinov2Model.from_pretrained(folder).eval()
    pixels = BitImageProcessorPil.from_pretrained(folder)(images=pil_images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(pixel_values=pixels)
    x = out.pooler_output if pooling == "cls" else out.last_hidden_state[:, 1:].mean(dim=1)
    return x / x.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_score_is_the_reduced_cosine_to_the_references_under_transformers(dirs, pooling, reduce):
    from PIL import Image

    images = random_uint8_images(4, 36, 44, seed=7)
    generated = transformers_features(dirs["model"], to_pil(images), pooling)
    refs = transformers_features(dirs["model"], [Image.open(p).convert("RGB") for p in dirs["paths"]], pooling)
    cosine = generated @ refs.T  # [4 images, 3 references]
    expected = cosine.mean(dim=1) if reduce == "mean" else cosine.amax(dim=1)
    reward = DinoSimilarity(str(dirs["model"]), references=str(dirs["refs"]), pooling=pooling, reduce=reduce, device="cpu")
    got = reward(images, ["ignored"] * 4)
    assert got.shape == (4,) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert expected.max() - expected.min() > 0.05  # the tiny model tells the images apart


def test_an_image_identical_to_a_reference_scores_one_at_max(dirs):
    reward = DinoSimilarity(str(dirs["model"]), references=str(dirs["refs"]), reduce="max", device="cpu")
    copies = torch.cat([load_image(dirs["paths"][0]), random_uint8_images(1, 36, 36, seed=8)])
    got = reward(copies)
    assert got[0] == pytest.approx(1.0, abs=1e-5) and got[1] < 0.99


def test_per_sample_references_in_metadata_replace_the_folder(dirs):
    first, second, third = map(str, dirs["paths"])
    images = load_image(first).expand(3, -1, -1, -1)  # three copies of the first reference
    meta = [{"reference": first}, {"reference": [second, third]}, {}]
    got = DinoSimilarity(str(dirs["model"]), references=str(dirs["refs"]), reduce="max", device="cpu")(images, None, meta)
    assert got[0] == pytest.approx(1.0, abs=1e-5)  # its own file is its reference
    assert got[1] < 0.99  # its references leave out its file, which the folder holds
    assert got[2] == pytest.approx(1.0, abs=1e-5)  # no metadata: the folder, which holds its file
    only_meta = DinoSimilarity(str(dirs["model"]), reduce="max", device="cpu")
    torch.testing.assert_close(only_meta(images[:2], None, meta[:2]), got[:2])
    with pytest.raises(ValueError, match=r"sample 0 has no reference images.*metadata\[i\]\['reference'\].*references=<folder>"):
        only_meta(images[:1], None, [{}])


def test_scores_do_not_depend_on_batching(dirs, dino):
    images = random_uint8_images(5, 36, 44, seed=9)
    whole = dino(images)
    chunked = DinoSimilarity(str(dirs["model"]), references=str(dirs["refs"]), batch_size=2, device="cpu")(images)
    alone = torch.cat([dino(images[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(alone, whole, atol=1e-6, rtol=1e-5)


def test_gradient_reaches_the_pixels_only_when_asked(dino):
    images = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(10), requires_grad=True)
    dino(images).sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert not dino(images.detach()).requires_grad


def test_missing_inputs_name_the_key_and_the_fix(dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"DinoSimilarity: path='/nonexistent/dino' is not a folder.*facebook/dinov2"):
        DinoSimilarity("/nonexistent/dino", device="cpu")
    with pytest.raises(FileNotFoundError, match=r"references='/nonexistent/refs' is not a folder"):
        DinoSimilarity(str(dirs["model"]), references="/nonexistent/refs", device="cpu")
    with pytest.raises(FileNotFoundError, match="holds no images"):
        DinoSimilarity(str(dirs["model"]), references=str(tmp_path), device="cpu")
