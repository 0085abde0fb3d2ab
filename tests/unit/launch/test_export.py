"""launch.export: the exported LoRA / merged folder loads in diffusers and reproduces the trained
transformer; the model card says what was trained; nothing is overwritten unasked."""
from __future__ import annotations

import filecmp
import json

import pytest
import torch
from safetensors import safe_open
from trained_checkpoints import STEP, TINY_SD3, make_checkpoint, random_inputs, tiny_wan_folder, transformer_out

from launch.export import ExportConfig, export

TOL = 1e-5


def _close(out, trained) -> bool:
    """Equal up to fp32 rounding: a merged export computes (W + BA) x where the trained policy computed
    W x + B(A x), so the difference grows with the outputs' size (1e-5 relative to the largest, at least
    1e-5 absolute; the GEMM kernels of the machine set the exact rounding)."""
    return bool((out - trained).abs().max() <= TOL * max(1.0, float(trained.abs().max())))
EVAL_ROWS = [
    {"step": 0, "eval/geneval": 0.25, "eval/geneval/count": 0.5, "eval/jpeg": -3.5, "eval/num_prompts": 16},
    {"step": 1, "reward/total": 0.1},
    {"step": STEP, "eval/geneval": 0.625, "eval/geneval/count": 0.75, "eval/jpeg": -2.125, "eval/num_prompts": 16},
]


# The toys leave these slots empty ([null, null] in model_index.json); diffusers needs them passed as None.
TOY_ABSENT = {"text_encoder_2": None, "text_encoder_3": None, "tokenizer_2": None, "tokenizer_3": None, "vae": None}


def _pipeline(folder, **absent):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(folder, **absent)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_sd3_dir):
    run = tmp_path_factory.mktemp("lora_run")
    ckpt, policy = make_checkpoint(run, [*TINY_SD3, f"model.path={tiny_sd3_dir}", "experiment=toy_shapes"], EVAL_ROWS)
    return ckpt, policy


def _assert_trained_not_base(policy, base_out, inputs):
    """The trained transformer is far from the base one, so matching it is not matching the base."""
    trained = transformer_out(policy.transformer, inputs)
    assert (trained - base_out).abs().max() > 1000 * TOL
    return trained


def test_lora_export_loads_into_the_base_pipeline_and_reproduces_the_trained_transformer(lora_run, tiny_sd3_dir, tmp_path):
    ckpt, policy = lora_run
    out = export(ExportConfig(checkpoint=str(ckpt), out=str(tmp_path / "lora")))
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "pytorch_lora_weights.safetensors"]
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
        config = json.loads(f.metadata()["lora_adapter_metadata"])  # the LoraConfig, keys "transformer.<field>"
    assert keys and all(k.startswith("transformer.") and ".lora_" in k for k in keys)
    assert config["transformer.r"] == 4 and config["transformer.lora_alpha"] == 8

    pipe = _pipeline(tiny_sd3_dir)
    inputs = random_inputs(pipe.transformer)
    trained = _assert_trained_not_base(policy, transformer_out(pipe.transformer, inputs), inputs)
    pipe.load_lora_weights(out)
    assert _close(transformer_out(pipe.transformer, inputs), trained)


def test_merged_export_is_a_full_folder_with_the_trained_transformer(lora_run, tiny_sd3_dir, tmp_path):
    ckpt, policy = lora_run
    out = export(ExportConfig(checkpoint=str(ckpt), out=str(tmp_path / "merged"), merge=True))
    pipe = _pipeline(out)
    # A plain transformer (LoRA folded in), not an adapter on top of the base.
    assert not any("lora" in k for k in pipe.transformer.state_dict())
    base = _pipeline(tiny_sd3_dir)
    inputs = random_inputs(pipe.transformer)
    trained = _assert_trained_not_base(policy, transformer_out(base.transformer, inputs), inputs)
    assert _close(transformer_out(pipe.transformer, inputs), trained)
    # Every other component is the base's, byte for byte.
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "scheduler"):
        cmp = filecmp.dircmp(tiny_sd3_dir / name, out / name)
        assert cmp.left_list == cmp.right_list and not cmp.diff_files and not cmp.funny_files, name
    # The policy itself is untouched by the merge (it is merged into a copy of the state, not in place).
    assert any("lora_A" in k for k, _ in policy.transformer.named_parameters())


def test_full_finetune_exports_merged_and_refuses_a_lora(tmp_path, tiny_sd3_dir):
    ckpt, policy = make_checkpoint(tmp_path / "run", [*TINY_SD3, f"model.path={tiny_sd3_dir}", "model.finetune=full"])
    # Refused from the config, before the model loads; the adapter refuses too (export may be bypassed).
    with pytest.raises(ValueError, match=r"model.finetune=full.*add merge=true"):
        export(ExportConfig(checkpoint=str(ckpt), out=str(tmp_path / "lora")))
    with pytest.raises(ValueError, match="merge=true"):
        policy.save_lora(tmp_path / "lora")
    assert not (tmp_path / "lora").exists() and not (tmp_path / ".lora.partial").exists()
    out = export(ExportConfig(checkpoint=str(ckpt), out=str(tmp_path / "full"), merge=True))
    pipe = _pipeline(out)
    base = _pipeline(tiny_sd3_dir)
    inputs = random_inputs(pipe.transformer)
    trained = _assert_trained_not_base(policy, transformer_out(base.transformer, inputs), inputs)
    assert _close(transformer_out(pipe.transformer, inputs), trained)
    assert "full (every weight of the denoiser)" in (out / "README.md").read_text()


@pytest.mark.parametrize("merge", [False, True])
def test_the_shipped_toy_exports_both_ways(tmp_path, merge):
    """The embedded digits toy (pixel space, one CLIP encoder, no VAE/T5: null slots in model_index.json)."""
    from trainer.config import ROOT

    ckpt, policy = make_checkpoint(tmp_path / "run", ["model=toy_digits", "model.lora_alpha=32"])
    out = export(ExportConfig(checkpoint=str(ckpt), out=str(tmp_path / "out"), merge=merge))
    base = _pipeline(ROOT / "models/toy/weights/digits16", **TOY_ABSENT)
    inputs = random_inputs(base.transformer)
    trained = _assert_trained_not_base(policy, transformer_out(base.transformer, inputs), inputs)
    if merge:
        pipe = _pipeline(out, **TOY_ABSENT)
    else:
        pipe = base
        pipe.load_lora_weights(out)
    assert pipe.vae is None and pipe.text_encoder_2 is None and pipe.text_encoder_3 is None
    assert _close(transformer_out(pipe.transformer, inputs), trained)
    # The card's snippet passes the absent slots, so it runs as written.
    assert ", text_encoder_2=None, text_encoder_3=None, tokenizer_2=None, tokenizer_3=None, vae=None)" in \
        (out / "README.md").read_text()


def test_model_card_says_what_was_trained(lora_run, tiny_sd3_dir, tmp_path):
    ckpt, _ = lora_run
    card = (export(ExportConfig(checkpoint=str(ckpt), out=str(tmp_path / "x"))) / "README.md").read_text()
    assert card.startswith("---\nbase_model: ")
    for fact in [
        f"| base model | `{tiny_sd3_dir}` (StableDiffusion3Pipeline) |",
        "| family (adapter) | `models.sd3.SD3Policy` |",
        "| fine-tuning | LoRA rank 4, alpha 8 on to_q, to_k, to_v, to_out.0,",
        "| EMA | not enabled",
        "| algorithm | `grpo`: group_size=8;",  # toy_shapes's values
        "clip_range=0.001; kl_beta=0.01",
        "| sampler | `FlowSDESampler`: num_steps=8; eval_num_steps=8; guidance_scale=1;",
        "noise_level=0.7",
        f"| steps | {STEP} of train.steps=40,",
        "| jpeg (trained) | 1 | `rewards.jpeg.JpegCompressibility` | quality=95; sign=-1 |",
        "| shapes (trained) | 0 | `rewards.shapes.ShapesReward` |",
        "| geneval (evaluation) | 1 |",
        # Evaluation before (step 0) and after (the checkpoint's step), top-level metrics only.
        f"| metric | before (step 0) | after (step {STEP}) |",
        "| eval/geneval | 0.25 | 0.625 |",
        "| eval/jpeg | -3.5 | -2.125 |",
        "16 prompts",
        f'pipe = StableDiffusion3Pipeline.from_pretrained("{tiny_sd3_dir}")\npipe.load_lora_weights("{tmp_path / "x"}")',
    ]:
        assert fact in card, fact
    assert "eval/geneval/count" not in card
    # The exact resolved config, verbatim.
    assert "```yaml\n" + (ckpt / "config.yaml").read_text().rstrip() + "\n```" in card


def test_card_without_the_runs_metrics_says_so(tmp_path, tiny_sd3_dir):
    ckpt, _ = make_checkpoint(tmp_path / "run", [*TINY_SD3, f"model.path={tiny_sd3_dir}"])
    card = (export(ExportConfig(checkpoint=str(ckpt), out=str(tmp_path / "x"))) / "README.md").read_text()
    assert "Not available: no metrics.jsonl beside the checkpoint" in card


def test_non_empty_out_is_refused_and_kept_unless_overwrite(lora_run, tmp_path):
    ckpt, _ = lora_run
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="overwrite=true"):
        export(ExportConfig(checkpoint=str(ckpt), out=str(out)))
    assert (out / "mine.txt").read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    export(ExportConfig(checkpoint=str(ckpt), out=str(out), overwrite=True))
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "pytorch_lora_weights.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial or replaced folder left behind
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (export(ExportConfig(checkpoint=str(ckpt), out=str(empty))) / "README.md").is_file()


def test_a_failed_export_leaves_the_old_out_and_no_partial_folder(lora_run, tmp_path, monkeypatch):
    from models.sd3 import SD3Policy

    ckpt, _ = lora_run
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")

    def fail_midway(self, out_dir):
        (out_dir / "pytorch_lora_weights.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(SD3Policy, "save_lora", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        export(ExportConfig(checkpoint=str(ckpt), out=str(out), overwrite=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and sorted(p.name for p in out.iterdir()) == ["mine.txt"]


def test_every_argument_problem_is_reported_at_once_before_loading(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    with pytest.raises(ValueError) as err:
        export(ExportConfig(checkpoint=str(tmp_path / "nope"), out=str(tmp_path / "out"), ema=True, dtype="bfloat16"))
    msg = str(err.value)
    for part in ["has no config.yaml or policy.safetensors", "overwrite=true", "ema=true", "holds no EMA",
                 "dtype=bfloat16", "merge=true"]:
        assert part in msg, part


def test_out_may_not_hold_the_base_model_or_the_checkpoint(tmp_path, tiny_sd3_dir):
    ckpt, _ = make_checkpoint(tmp_path / "run", [*TINY_SD3, f"model.path={tiny_sd3_dir}"])
    for out, what in [(tiny_sd3_dir, "the base model folder"), (tmp_path / "run", "the checkpoint")]:
        with pytest.raises(ValueError, match=f"holds {what}"):
            export(ExportConfig(checkpoint=str(ckpt), out=str(out), overwrite=True))
    assert (tiny_sd3_dir / "model_index.json").is_file() and (ckpt / "policy.safetensors").is_file()


def test_merge_dtype_sets_the_merged_weights_dtype(lora_run, tmp_path):
    ckpt, policy = lora_run
    out = export(ExportConfig(checkpoint=str(ckpt), out=str(tmp_path / "bf16"), merge=True, dtype="bfloat16"))
    with safe_open(str(out / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    pipe = _pipeline(out)
    inputs = random_inputs(pipe.transformer)
    got = transformer_out(pipe.transformer.float(), inputs)
    trained = transformer_out(policy.transformer, inputs)
    with policy.reference():
        base = transformer_out(policy.transformer, inputs)
    # bf16 weights: ~3 significant digits, yet far closer to the trained model than to the base.
    assert (got - trained).abs().max() < 0.05 * (trained - base).abs().max()


def test_a_video_model_exports_both_ways(tmp_path):
    """The same export for the video family (models.wan.WanPolicy): WanPipeline loads LoRA and merged."""
    from diffusers import WanPipeline

    folder = tiny_wan_folder(tmp_path / "wan")
    ckpt, policy = make_checkpoint(tmp_path / "run", ["model=toy_video", f"model.path={folder}"])
    lora = export(ExportConfig(checkpoint=str(ckpt), out=str(tmp_path / "lora")))
    merged = export(ExportConfig(checkpoint=str(ckpt), out=str(tmp_path / "merged"), merge=True))
    c = policy.transformer.config
    g = torch.Generator().manual_seed(0)
    inputs = {"hidden_states": torch.randn(1, c.in_channels, policy.num_frames, 16, 16, generator=g), "timestep": torch.tensor([500.0]),
              "encoder_hidden_states": torch.randn(1, 8, c.text_dim, generator=g)}
    pipe = WanPipeline.from_pretrained(folder, vae=None)  # the toy has no VAE (pixel space)
    trained = _assert_trained_not_base(policy, transformer_out(pipe.transformer, inputs), inputs)
    pipe.load_lora_weights(lora)
    assert _close(transformer_out(pipe.transformer, inputs), trained)
    pipe = WanPipeline.from_pretrained(merged, vae=None)
    assert _close(transformer_out(pipe.transformer, inputs), trained)
    card = (lora / "README.md").read_text()
    assert "| family (adapter) | `models.wan.WanPolicy` |" in card
    assert f'pipe = WanPipeline.from_pretrained("{folder}", vae=None)' in card
