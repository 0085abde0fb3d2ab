"""VlmYesNoJudge and PromptEcho on a tiny random LLaVA saved as a transformers folder, against the
model's own next-token distribution and its own teacher-forced loss, one unpadded sample at a time."""

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from rewards.vlm_local import PromptEcho, VlmYesNoJudge, pil_images
from tiny_reward_models import NO_TOKENS, YES_TOKENS, random_uint8_images, save_reference_images, save_tiny_llava

# Different lengths, so batches are left-padded.
PROMPTS = ["a red circle", "two cats on a mat", "x", "a very long prompt about a zebra under a tree at night"]


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


@pytest.fixture(scope="module")
def raw(llava_dir):
    return LlavaForConditionalGeneration.from_pretrained(llava_dir).eval(), AutoProcessor.from_pretrained(llava_dir)


@pytest.fixture(scope="module")
def images():
    return random_uint8_images(len(PROMPTS), 40, 36, seed=11)


def user_turn(processor, text, n_images=1):
    messages = [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@torch.no_grad()
def next_token_probs(raw, text, images):
    model, processor = raw
    return model(**processor(text=[text], images=images, return_tensors="pt")).logits[0, -1].softmax(dim=-1)


def yes_share(probs, processor):
    yes = probs[processor.tokenizer.convert_tokens_to_ids(list(YES_TOKENS))].sum()
    no = probs[processor.tokenizer.convert_tokens_to_ids(list(NO_TOKENS))].sum()
    return yes / (yes + no), yes + no


def test_judge_counts_every_spelling_of_yes_and_no(llava_dir, raw):
    judge = VlmYesNoJudge(str(llava_dir), device="cpu", dtype="float32")
    tokenizer = raw[1].tokenizer
    assert sorted(judge.yes_ids.tolist()) == sorted(tokenizer.convert_tokens_to_ids(list(YES_TOKENS)))
    assert sorted(judge.no_ids.tolist()) == sorted(tokenizer.convert_tokens_to_ids(list(NO_TOKENS)))


def test_judge_is_p_yes_over_yes_plus_no_of_the_unpadded_model(llava_dir, raw, images):
    question = 'Does this image show "{prompt}"? Answer yes or no.'
    expected = [yes_share(next_token_probs(raw, user_turn(raw[1], question.format(prompt=p)), [im]), raw[1])
                for p, im in zip(PROMPTS, pil_images(images))]
    for batch_size in (4, 3):  # one left-padded batch; a full chunk and a short one
        out = VlmYesNoJudge(str(llava_dir), question=question, batch_size=batch_size, device="cpu", dtype="float32")(images, PROMPTS)
        torch.testing.assert_close(out["reward"], torch.stack([e[0] for e in expected]), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out["yes_no_mass"], torch.stack([e[1] for e in expected]), atol=1e-6, rtol=1e-4)
    assert out["reward"].dtype == torch.float32 and out["reward"].std() > 1e-4  # the images are told apart


def test_judge_with_a_reference_image_shows_both(llava_dir, raw, images, tmp_path):
    refs = save_reference_images(tmp_path, sizes=((32, 32), (48, 40)))
    question = "Is the first image better than the second at showing {prompt}?"
    judge = VlmYesNoJudge(str(llava_dir), question=question, reference_key="ref", device="cpu", dtype="float32")
    meta = [{"ref": str(refs[0])}, {"ref": str(refs[1])}]
    got = judge(images[:2], PROMPTS[:2], meta)["reward"]
    from PIL import Image

    for i in range(2):
        pair = [pil_images(images[i : i + 1])[0], Image.open(refs[i]).convert("RGB")]
        want, _ = yes_share(next_token_probs(raw, user_turn(raw[1], question.format(prompt=PROMPTS[i]), 2), pair), raw[1])
        assert got[i].item() == pytest.approx(want.item(), abs=1e-5)
    swapped = judge(images[:2], PROMPTS[:2], meta[::-1])["reward"]
    assert not torch.allclose(swapped, got)  # the reference image reaches the model
    with pytest.raises(ValueError, match=r"reference_key='ref' needs metadata\[i\]\['ref'\]"):
        judge(images[:2], PROMPTS[:2], [{"ref": str(refs[0])}, {}])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_prompt_echo_is_the_models_own_teacher_forced_loss(llava_dir, raw, images, reduction):
    model, processor = raw
    query = "Describe this image in detail."
    echo = PromptEcho(str(llava_dir), query=query, reduction=reduction, batch_size=3, device="cpu", dtype="float32")
    out = echo(images, PROMPTS)
    for i, (prompt, image) in enumerate(zip(PROMPTS, pil_images(images))):
        prefix = processor(text=[user_turn(processor, query)], images=[image], return_tensors="pt")
        full = processor(text=[user_turn(processor, query) + prompt], images=[image], return_tensors="pt")
        labels = full["input_ids"].clone()
        labels[:, : prefix["input_ids"].shape[1]] = -100  # score the answer only
        with torch.no_grad():
            loss = model(**full, labels=labels).loss  # mean cross-entropy over the answer tokens
        n = len(processor.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert out["prompt_tokens"][i] == n
        assert out["logprob_mean"][i].item() == pytest.approx(-loss.item(), abs=1e-5)
        assert out["logprob_sum"][i].item() == pytest.approx(-loss.item() * n, rel=1e-5)
    assert torch.equal(out["reward"], out["logprob_mean"] if reduction == "mean" else out["logprob_sum"])


def test_prompt_echo_depends_on_the_image(llava_dir, images):
    """Swapping the images changes the scores: the image reaches the likelihood."""
    echo = PromptEcho(str(llava_dir), device="cpu", dtype="float32")
    same = echo(images, PROMPTS)["reward"]
    shuffled = echo(images.flip(0), PROMPTS)["reward"]
    assert not torch.allclose(same, shuffled)


def test_bfloat16_runs_and_stays_close(llava_dir, images):
    full = VlmYesNoJudge(str(llava_dir), device="cpu", dtype="float32")(images, PROMPTS)["reward"]
    half = VlmYesNoJudge(str(llava_dir), device="cpu", dtype="bfloat16")(images, PROMPTS)["reward"]
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, atol=0.02, rtol=0)


def test_config_errors(llava_dir):
    with pytest.raises(FileNotFoundError, match=r"VlmYesNoJudge: path='/nonexistent/vlm' is not a folder.*hf download"):
        VlmYesNoJudge("/nonexistent/vlm", device="cpu")
    with pytest.raises(ValueError, match="may only use the placeholder"):
        VlmYesNoJudge(str(llava_dir), question="Is {thing} there?", device="cpu")
    with pytest.raises(ValueError, match="must be strings"):
        VlmYesNoJudge(str(llava_dir), yes_words=(True,), device="cpu")
    with pytest.raises(ValueError, match="reads as"):
        VlmYesNoJudge(str(llava_dir), yes_words=("absolutely",), device="cpu", dtype="float32")
    with pytest.raises(ValueError, match="reduction must be"):
        PromptEcho(str(llava_dir), reduction="max", device="cpu")
