"""VlmPairwisePreference (Pref-GRPO's VLM pair judge) on a tiny random LLaVA folder: each ordered pair's
P(first) equals the model's own next-token distribution on that pair alone; the matrix is debiased over
both orders (P + P.T = 1); WinRate with it scores a group."""

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from rewards.vlm_local import VlmPairwisePreference, pil_images
from rewards.winrate import WinRate
from tiny_reward_models import random_uint8_images, save_tiny_llava

QUESTION = 'Which image shows "{prompt}" better, the first or the second? Answer 1 or 2.'


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("tiny_llava_pairs"))


@torch.no_grad()
def p_first_by_hand(folder, a, b, prompt):
    """P("1") / (P("1") + P("2")) of the next token, one unpadded pair through the raw model."""
    model, processor = LlavaForConditionalGeneration.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": QUESTION.format(prompt=prompt)}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    probs = model(**processor(text=[text], images=[a, b], return_tensors="pt")).logits[0, -1].softmax(-1)
    vocab = processor.tokenizer.convert_ids_to_tokens(list(range(len(processor.tokenizer))))
    one = probs[[i for i, t in enumerate(vocab) if t is not None and t.replace("Ġ", "").strip() == "1"]].sum()
    two = probs[[i for i, t in enumerate(vocab) if t is not None and t.replace("Ġ", "").strip() == "2"]].sum()
    return float(one / (one + two))


def test_preference_is_the_order_debiased_next_token_share(llava_dir):
    images = random_uint8_images(3, 32, 32, seed=5)
    judge = VlmPairwisePreference(str(llava_dir), question=QUESTION, device="cpu", dtype="float32", batch_size=4)
    p = judge.preference(images, "a red circle")
    pil = pil_images(images)
    a_b = p_first_by_hand(llava_dir, pil[0], pil[2], "a red circle")
    b_a = p_first_by_hand(llava_dir, pil[2], pil[0], "a red circle")
    assert p[0, 2].item() == pytest.approx((a_b + 1 - b_a) / 2, abs=1e-5)
    torch.testing.assert_close(p + p.T, torch.ones(3, 3))
    assert torch.all(p.diagonal() == 0.5)
    assert (p - 0.5).abs().max() > 0  # a random VLM's preferences are faint (~1e-6 here) but not absent


def test_win_rate_with_the_vlm_judge_scores_each_group(llava_dir):
    images = random_uint8_images(4, 32, 32, seed=6)
    judge = VlmPairwisePreference(str(llava_dir), device="cpu", dtype="float32")
    out = WinRate(judge)(images, ["a cat"] * 2 + ["a dog"] * 2, [{"prompt_id": i // 2, "sample_id": i % 2} for i in range(4)])
    # Two samples per group: the win rates of a pair sum to 1.
    assert out["reward"][0] + out["reward"][1] == pytest.approx(1.0) and out["reward"][2] + out["reward"][3] == pytest.approx(1.0)


def test_bad_question_is_refused_before_loading(llava_dir):
    with pytest.raises(ValueError, match="placeholder"):
        VlmPairwisePreference(str(llava_dir), question="Which is better at {task}?", device="cpu")
