"""Flow matching against diffusers' own scheduler / pipeline / training-utils code (the reference)."""
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift as diffusers_calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling

from megatron_qwen_image import flow_matching as fm


@pytest.mark.parametrize("seq_len", [64, 256, 1024, 4096, 6889])
@pytest.mark.parametrize("params", [(256, 4096, 0.5, 1.15), (256, 8192, 0.5, 0.9)])
def test_calculate_shift_matches_qwenimage_pipeline(seq_len, params):
    assert fm.calculate_shift(seq_len, *params) == pytest.approx(diffusers_calculate_shift(seq_len, *params), rel=1e-12)


@pytest.mark.parametrize("kind", ["exponential", "linear"])
def test_dynamic_shift_matches_scheduler_time_shift(kind):
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type=kind)
    sigmas = np.linspace(1.0, 0.02, 25).astype(np.float32)
    mu = diffusers_calculate_shift(1024)
    sched.set_timesteps(sigmas=sigmas, mu=mu)  # the scheduler shifts them with time_shift(mu, 1.0, sigmas)
    spec = fm.SigmaSampling(timestep_shift="dynamic", time_shift_type=kind)
    ours = fm.shift_sigmas(torch.from_numpy(sigmas).double(), 1024, spec).float()
    torch.testing.assert_close(ours, sched.sigmas[:-1], rtol=1e-6, atol=1e-7)
    # and the bare function against the scheduler's method
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(fm.time_shift(0.7, t, kind, 1.3), sched.time_shift(0.7, 1.3, t))


def test_static_shift_matches_scheduler():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sigmas = np.linspace(1.0, 0.05, 20).astype(np.float32)
    sched.set_timesteps(sigmas=sigmas)
    spec = fm.SigmaSampling(timestep_shift="static", shift=3.0)
    torch.testing.assert_close(fm.shift_sigmas(torch.from_numpy(sigmas), 0, spec), sched.sigmas[:-1])
    assert fm.static_shift(torch.tensor(1.0), 3.0) == 1.0  # the endpoints stay put
    assert fm.static_shift(torch.tensor(0.0), 3.0) == 0.0


def test_logit_normal_matches_training_utils():
    """Per-sample draw = diffusers' compute_density_for_timestep_sampling('logit_normal') with that generator."""
    spec = fm.SigmaSampling(logit_mean=0.3, logit_std=1.4)
    keys = ["a", "b", "c"]
    _, sigma = fm.draw_noise_and_sigmas(keys, step=7, seed=11, latent_shape=(16, 4, 4), image_seq_len=4, spec=spec)
    for key, s in zip(keys, sigma):
        gen = torch.Generator().manual_seed(fm.sample_seed(11, 7, key))
        ref = compute_density_for_timestep_sampling("logit_normal", 1, logit_mean=0.3, logit_std=1.4, generator=gen)
        torch.testing.assert_close(s.reshape(1), ref)


def test_logit_normal_distribution():
    keys = [f"k{i}" for i in range(4000)]
    _, sigma = fm.draw_noise_and_sigmas(keys, 0, 0, (1,), 1, fm.SigmaSampling())
    assert 0 < sigma.min() and sigma.max() < 1
    assert abs(sigma.median().item() - 0.5) < 0.03  # sigmoid(N(0, 1)) is symmetric about 1/2
    logits = torch.logit(sigma.double())
    assert abs(logits.std().item() - 1.0) < 0.05


def test_noisy_latents_match_scale_noise_and_pure_noise_at_sigma_one():
    sched = FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(num_inference_steps=10)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 16, 6, 8, generator=g), torch.randn(2, 16, 6, 8, generator=g)
    for i in [0, 3, 9]:
        t, sigma = sched.timesteps[i], sched.sigmas[i]
        ref = sched.scale_noise(x0, t.repeat(2), noise)
        torch.testing.assert_close(fm.noisy_latents(x0, noise, sigma.repeat(2)), ref)
    assert sched.sigmas[0] == 1.0
    torch.testing.assert_close(fm.noisy_latents(x0, noise, torch.ones(2)), noise)  # sigma = 1: pure noise
    torch.testing.assert_close(fm.noisy_latents(x0, noise, torch.zeros(2)), x0)


def test_velocity_target_is_what_the_euler_step_integrates():
    """The scheduler's Euler step with the true velocity lands exactly on x at the next sigma."""
    sched = FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(num_inference_steps=8)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(1, 16, 4, 4, generator=g), torch.randn(1, 16, 4, 4, generator=g)
    v = fm.velocity_target(x0, noise)
    for i in range(8):
        x_t = fm.noisy_latents(x0, noise, sched.sigmas[i].reshape(1))
        stepped = sched.step(v, sched.timesteps[i], x_t).prev_sample
        torch.testing.assert_close(stepped, fm.noisy_latents(x0, noise, sched.sigmas[i + 1].reshape(1)),
                                   rtol=1e-5, atol=1e-5)
    # and the closed form: d x_t / d sigma = v
    s = torch.tensor([0.37])
    eps = 1e-3
    fd = (fm.noisy_latents(x0, noise, s + eps) - fm.noisy_latents(x0, noise, s - eps)) / (2 * eps)
    torch.testing.assert_close(fd, v, rtol=1e-3, atol=1e-3)


def test_draws_do_not_depend_on_batch_split():
    spec = fm.SigmaSampling()
    keys = ["s0", "s1", "s2", "s3"]
    n_all, s_all = fm.draw_noise_and_sigmas(keys, 5, 3, (16, 2, 2), 1, spec)
    n_a, s_a = fm.draw_noise_and_sigmas(keys[:2], 5, 3, (16, 2, 2), 1, spec)
    n_b, s_b = fm.draw_noise_and_sigmas(keys[2:], 5, 3, (16, 2, 2), 1, spec)
    torch.testing.assert_close(n_all, torch.cat([n_a, n_b]), rtol=0, atol=0)
    torch.testing.assert_close(s_all, torch.cat([s_a, s_b]), rtol=0, atol=0)
    n_next, _ = fm.draw_noise_and_sigmas(keys, 6, 3, (16, 2, 2), 1, spec)
    assert not torch.equal(n_all, n_next)  # a new step draws new noise


def test_loss_is_per_sample_mse():
    g = torch.Generator().manual_seed(2)
    pred, target = torch.randn(3, 10, 64, generator=g), torch.randn(3, 10, 64, generator=g)
    per_sample = fm.flow_matching_loss(pred, target)
    ref = torch.stack([torch.nn.functional.mse_loss(p, t) for p, t in zip(pred, target)])
    torch.testing.assert_close(per_sample, ref)


def test_edit_loss_feeds_the_condition_clean_and_scores_only_the_target():
    """sample_losses with condition latents = diffusers' transformer on [x_t, clean condition tokens] with the
    edit pipeline's img_shapes, scored on the target tokens only; the condition changes the loss."""
    from tests.reference_models import build_tiny_diffusers_transformer, megatron_from_diffusers
    from tests.reference_models import single_process_model_parallel

    diff = build_tiny_diffusers_transformer(seed=8, zero_cond_t=True)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 12, 64, generator=gen), torch.randn(2, 12, 64, generator=gen)
    cond = torch.randn(2, 6, 64, generator=gen)
    text = torch.randn(2, 5, 64, generator=gen)
    sigma = torch.tensor([0.3, 0.8])
    with single_process_model_parallel(), torch.no_grad():
        model = megatron_from_diffusers(diff).eval()
        ours = fm.sample_losses(model, x0, noise, sigma, text, [5, 5], (3, 4), torch.float32, cond, [(2, 3)])
        pred = diff(hidden_states=torch.cat([fm.noisy_latents(x0, noise, sigma), cond], dim=1),
                    encoder_hidden_states=text, encoder_hidden_states_mask=torch.ones(2, 5), timestep=sigma,
                    img_shapes=[[(1, 3, 4), (1, 2, 3)]] * 2, return_dict=False)[0]
        ref = (pred[:, :12] - (noise - x0)).pow(2).mean(dim=(1, 2))
        assert torch.allclose(ours, ref, rtol=1e-5, atol=0)
        other = fm.sample_losses(model, x0, noise, sigma, text, [5, 5], (3, 4), torch.float32, cond + 1, [(2, 3)])
        assert not torch.allclose(ours, other)
