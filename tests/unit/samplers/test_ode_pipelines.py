"""Deterministic samplers against the diffusers code they replace, on tiny random models built from config:
FLUX (FluxPipeline, flow matching with a resolution-dependent shift), DDIM eta=0 (DDIMPipeline on a UNet),
DDIM eta>0 step by step against DDIMScheduler.step fed the same noise, and DPM-Solver++(2M) against
DPMSolverMultistepScheduler with flow sigmas. (SD3: tests/unit/models/test_sd3.py.)"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sampler_truth import flow_velocity
from samplers.ddim import DDIMSampler
from samplers.flow_sde import FlowSDESampler
from samplers.ode import ODESampler

TOL = 1e-5  # max abs difference (the bound)


# --------------------------------------------------------------------------------------------- FLUX
def build_tiny_flux():
    from conftest import _tiny_clip_tokenizer
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    tok = _tiny_clip_tokenizer()
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                 decoder_start_token_id=0, pad_token_id=1, eos_token_id=1))
    # in_channels = 4 latent channels x a 2x2 patch (FLUX packs latents); rope axes sum to the head dim.
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32,
        use_quant_conv=False, use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    for module in (clip, t5, transformer, vae):
        module.eval()  # built from config they start in training mode, where T5's dropout draws noise
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tok, text_encoder_2=t5,
                        tokenizer_2=_tiny_clip_tokenizer(), transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def flux():
    return build_tiny_flux()


def test_ode_matches_the_flux_pipeline(flux):
    """The sampler gets FLUX's sigmas (shifted by mu from the image's sequence length) and a predict_fn
    that calls the transformer as the pipeline does; its final latents equal the pipeline's."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    size, steps, guidance, prompt = 32, 5, 3.5, "a red circle"
    latents, image_ids = flux.prepare_latents(1, 4, size, size, torch.float32, "cpu", torch.Generator().manual_seed(0))
    expected = flux(prompt, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                    latents=latents.clone(), output_type="latent", max_sequence_length=16).images
    embeds, pooled, text_ids = flux.encode_prompt(prompt, prompt_2=None, max_sequence_length=16)
    sched = flux.scheduler
    mu = calculate_shift(latents.shape[1], sched.config.base_image_seq_len, sched.config.max_image_seq_len,
                         sched.config.base_shift, sched.config.max_shift)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    sigmas, timesteps = sched.sigmas.float(), sched.timesteps.float()

    def predict(x, sigma, cond):
        t = timesteps[(sigmas[:-1] - sigma[0]).abs().argmin()]  # the scheduler's timestep for this sigma
        return flux.transformer(
            hidden_states=x, timestep=t.expand(x.shape[0]) / 1000, guidance=torch.full((x.shape[0],), guidance),
            pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=image_ids,
            return_dict=False)[0]

    traj = ODESampler(num_steps=steps).rollout(
        predict, latents, sigmas, None, [torch.Generator()], torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    assert traj.final.shape == expected.shape == (1, (size // 4) ** 2, 16)  # packed 2x2 patches of the 2x VAE
    assert (traj.final - expected).abs().max() <= TOL
    assert (traj.final - latents).abs().max() > 0.1  # sampling went somewhere: the match is not trivial
    assert float(sigmas[1]) != pytest.approx(1 - 1 / steps, abs=1e-3)  # the shift was really applied


# ---------------------------------------------------------------------------------------------- DDIM
class TinyVPPolicy:
    """A test adapter for an epsilon-prediction UNet: sigmas() are sqrt(1 - alphas_cumprod) of the DDIM
    scheduler's timesteps (and of its final alpha), predict() maps sigma back to the timestep."""

    def __init__(self, unet, scheduler):
        self.unet, self.scheduler = unet, scheduler

    def sigmas(self, num_steps):
        s = self.scheduler
        s.set_timesteps(num_steps)
        ac = s.alphas_cumprod
        self.timesteps = s.timesteps
        prev = int(s.timesteps[-1]) - s.config.num_train_timesteps // num_steps
        final = ac[prev] if prev >= 0 else s.final_alpha_cumprod
        self.table = torch.cat([(1 - ac[s.timesteps]).sqrt(), (1 - final).sqrt().reshape(1)]).float()
        return self.table

    def predict(self, x, sigma, cond):
        t = self.timesteps[(self.table[:-1] - sigma[0]).abs().argmin()]
        return self.unet(x, t).sample


def build_tiny_ddim(set_alpha_to_one=True):
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel
    from diffusers.models.unets.unet_2d import UNet2DOutput

    class NearIdentityUNet(UNet2DModel):
        """eps = x + 0.1 * (a random UNet): a random UNet alone predicts an eps that makes x0_hat = x / sqrt(abar)
        explode (values ~40 by the end, where fp32 spacing is 4e-6); near eps = x the chain stays in the
        range a trained model keeps it in, and the pipeline's output is mostly unclipped."""

        def forward(self, sample, timestep, *args, **kwargs):
            return UNet2DOutput(sample=sample + 0.1 * super().forward(sample, timestep, *args, **kwargs).sample)

    torch.manual_seed(0)
    unet = NearIdentityUNet(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=set_alpha_to_one, steps_offset=1)
    pipe = DDIMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ddim():
    return build_tiny_ddim()


def _ddim_rollout(sampler, policy, seed, steps):
    """As trainer/rollout.py does: x_T is the first draw of the sample's generator, the step noise the next ones."""
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn((1, 3, 8, 8), generator=g)
    traj = sampler.rollout(policy.predict, x_T, policy.sigmas(steps), None, [g],
                           torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    return x_T, traj


def test_ddim_eta0_matches_the_ddim_pipeline(ddim):
    steps = 10
    policy = TinyVPPolicy(ddim.unet, ddim.scheduler)
    image = ddim(batch_size=1, generator=torch.Generator().manual_seed(3), eta=0.0, num_inference_steps=steps,
                 output_type="np").images  # [1, H, W, 3] in [0, 1]
    x_T, traj = _ddim_rollout(DDIMSampler(noise_level=0.0), policy, 3, steps)  # the pipeline's draw of x_T
    ours = (traj.final / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.abs(ours - image).max() <= TOL
    assert ((image > 0.01) & (image < 0.99)).mean() > 0.5  # mostly unclipped: the comparison is not vacuous
    assert (traj.final - x_T).abs().max() > 0.1


@pytest.mark.parametrize("eta, set_alpha_to_one", [(1.0, True), (1.0, False), (0.5, False), (0.0, True)])
def test_ddim_steps_match_the_scheduler_given_the_same_noise(eta, set_alpha_to_one):
    """Every step equals DDIMScheduler.step with the same eta and the noise our generators drew (DDPO: eta 1)."""
    pipe = build_tiny_ddim(set_alpha_to_one)
    steps, seed = 8, 11
    policy = TinyVPPolicy(pipe.unet, pipe.scheduler)
    _, traj = _ddim_rollout(DDIMSampler(noise_level=eta), policy, seed, steps)
    # Into abar = 1 the last step has no noise; with set_alpha_to_one=False it keeps some (SD1.5's setting).
    assert int(traj.stochastic[0].sum()) == (0 if eta == 0 else steps - (1 if set_alpha_to_one else 0))

    # Replay: the same generator, seeded alike, gives x_T and then one draw per stochastic step.
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((1, 3, 8, 8), generator=g)
    sched = pipe.scheduler
    sched.set_timesteps(steps)
    with torch.no_grad():
        for j, t in enumerate(sched.timesteps):
            eps = pipe.unet(x, t).sample
            noise = torch.randn((1, 3, 8, 8), generator=g) if traj.stochastic[0, j] else torch.zeros(1, 3, 8, 8)
            x = sched.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
            assert (traj.latents[:, j + 1] - x).abs().max() <= TOL, j
    assert (traj.final - traj.latents[:, 0]).abs().max() > 0.1


# ------------------------------------------------------------------------------------ DPM-Solver++(2M)
@pytest.mark.parametrize("steps", [6, 20])
def test_dpm2_matches_diffusers_dpm_solver_multistep_with_flow_sigmas(steps):
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, solver_order=2, algorithm_type="dpmsolver++", prediction_type="flow_prediction",
        use_flow_sigmas=True, flow_shift=3.0, final_sigmas_type="zero", lower_order_final=True)
    sched.set_timesteps(steps)
    sigmas = sched.sigmas.float()
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(1, 2, 64, generator=g)
    x = x_T.clone()
    for i, t in enumerate(sched.timesteps):
        x = sched.step(flow_velocity(x, sigmas[i : i + 1]).float(), t, x).prev_sample
    ode = ODESampler(ode_solver="dpm2", num_steps=steps)
    traj = ode.rollout(lambda x, s, c: flow_velocity(x, s).float(), x_T, sigmas, None, [g],
                       torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    assert (traj.final - x).abs().max() <= TOL
    # Second order really differs from Euler at these step counts.
    euler = ODESampler(num_steps=steps).rollout(lambda x, s, c: flow_velocity(x, s).float(), x_T, sigmas, None, [g],
                                                 torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    assert (euler.final - x).abs().max() > 1e-3


def test_dpm2_is_second_order():
    """On a Gaussian (smooth, linear velocity; the exact ODE map is MU + S * x_T) the error falls ~3.3x per
    halving of the step size (first-order end steps keep it below 4), Euler's ~2x."""
    mu, s = torch.tensor([1.5, -0.5]).reshape(1, 2, 1), torch.tensor([0.5, 2.0]).reshape(1, 2, 1)

    def velocity(x, sigma, cond):
        t = sigma.reshape(-1, 1, 1)
        return -mu + (t - (1 - t) * s**2) / ((1 - t) ** 2 * s**2 + t**2) * (x - (1 - t) * mu)

    x_T = torch.randn(1, 2, 256, generator=torch.Generator().manual_seed(1))

    def error(solver, steps):
        traj = ODESampler(ode_solver=solver, num_steps=steps).rollout(
            velocity, x_T, torch.linspace(1.0, 0.0, steps + 1), None, [torch.Generator()],
            torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
        return float((traj.final - (mu + s * x_T)).abs().max())

    errs = {solver: [error(solver, n) for n in (10, 20, 40)] for solver in ("euler", "dpm2")}
    for solver, low, high in (("dpm2", 2.8, 4.5), ("euler", 1.6, 2.3)):
        e = errs[solver]
        assert all(low < a / b < high for a, b in zip(e, e[1:])), errs
    assert errs["dpm2"][-1] < errs["euler"][-1] / 5, errs


def test_sde_sampler_at_noise_zero_is_its_ode(flux):
    """Evaluation uses the same family at noise 0: FlowSDESampler(noise_level=0) is the Euler ODE bitwise."""
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 2, 32, generator=g)
    args = (lambda x, s, c: flow_velocity(x, s).float(), x_T, torch.linspace(1, 0, 9), None, [g, g],
            torch.zeros(2, dtype=torch.long), torch.arange(2))
    a = FlowSDESampler(noise_level=0.7, num_steps=8).evaluation().rollout(*args)
    b = ODESampler(num_steps=8).rollout(*args)
    assert torch.equal(a.latents, b.latents) and not bool(a.stochastic.any())
