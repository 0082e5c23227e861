"""flexgen against diffusers, the library most users know, on the same inputs.

- The DiT network against ``DiTTransformer2DModel`` on the same random weights (the DiT
  golden fixture's reference-layout weights, mapped as diffusers'
  ``scripts/convert_dit_to_diffusers.py`` maps the released checkpoints), with diffusers'
  two deviations from the reference set to the reference's values.
- DDPM ancestral sampling and DDIM against ``DDPMScheduler`` / ``DDIMScheduler`` with both
  sides on float64 tables, driven by a network whose eps is exact for Gaussian data.
- Rectified-flow Euler against ``FlowMatchEulerDiscreteScheduler`` on flexgen's time grid.
"""
import math
import os.path as osp

import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DiTTransformer2DModel,
                       FlowMatchEulerDiscreteScheduler)
from safetensors.torch import load_file

import flexgen
from flexgen.models.backbones.flex_dit import FlexDiT
from flexgen.models.converters.dit_sit import DiTConverter
from flexgen.registry import SAMPLERS, TRANSPORTS
from flexgen.transports.ddpm import linear_betas, space_timesteps
from flexgen.structures import patchify, unpatchify

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
FIXTURE = osp.join(ROOT, 'tests', 'fixtures', 'dit', 'model.safetensors')
NUM_HEADS = 4  # the fixture's: width 64, 2 blocks, patch 2, 8 x 8 latents, learned sigma
T = 1000
MU, S = 1.5, 0.5  # Gaussian data N(MU, S^2) per dimension

flexgen.register_all_modules()


# ------------------------------------------------------------------------------ network
def diffusers_dit_state_dict(reference, depth):
    """Reference DiT keys -> ``DiTTransformer2DModel`` keys, as diffusers' conversion script
    does: the timestep MLP and label table are copied into every block's ``norm1.emb``, qkv
    is split into q, k, v; ``pos_embed`` is dropped (diffusers computes its own)."""
    out = {'pos_embed.proj.weight': reference['x_embedder.proj.weight'],
           'pos_embed.proj.bias': reference['x_embedder.proj.bias']}
    for kind in ('weight', 'bias'):
        out[f'proj_out_1.{kind}'] = reference[f'final_layer.adaLN_modulation.1.{kind}']
        out[f'proj_out_2.{kind}'] = reference[f'final_layer.linear.{kind}']
    for i in range(depth):
        ours, theirs = f'transformer_blocks.{i}.', f'blocks.{i}.'
        out[ours + 'norm1.emb.class_embedder.embedding_table.weight'] = reference[
            'y_embedder.embedding_table.weight']
        for kind in ('weight', 'bias'):
            out[ours + f'norm1.emb.timestep_embedder.linear_1.{kind}'] = reference[
                f't_embedder.mlp.0.{kind}']
            out[ours + f'norm1.emb.timestep_embedder.linear_2.{kind}'] = reference[
                f't_embedder.mlp.2.{kind}']
            out[ours + f'norm1.linear.{kind}'] = reference[theirs + f'adaLN_modulation.1.{kind}']
            q, k, v = reference[theirs + f'attn.qkv.{kind}'].chunk(3)
            out[ours + f'attn1.to_q.{kind}'] = q
            out[ours + f'attn1.to_k.{kind}'] = k
            out[ours + f'attn1.to_v.{kind}'] = v
            out[ours + f'attn1.to_out.0.{kind}'] = reference[theirs + f'attn.proj.{kind}']
            out[ours + f'ff.net.0.proj.{kind}'] = reference[theirs + f'mlp.fc1.{kind}']
            out[ours + f'ff.net.2.{kind}'] = reference[theirs + f'mlp.fc2.{kind}']
    return out


def test_dit_network_equals_diffusers_dit_transformer():
    reference = load_file(FIXTURE)
    converted = DiTConverter()(reference)
    ours = FlexDiT(num_heads=NUM_HEADS, **converted.backbone).eval()
    ours.load_state_dict(converted.state_dict, strict=True)
    depth, width = converted.backbone['depth'], converted.backbone['hidden_size']
    # diffusers departs from DiT twice; both are set to DiT's values here: its MLP LayerNorm
    # eps is 1e-5 (DiT: 1e-6, norm_eps), and its timestep sinusoid uses
    # downscale_freq_shift=1, frequencies exp(-ln(1e4) i / 127) (DiT: / 128, shift 0).
    theirs = DiTTransformer2DModel(
        num_attention_heads=NUM_HEADS, attention_head_dim=width // NUM_HEADS, in_channels=4,
        out_channels=8, num_layers=depth, sample_size=8, patch_size=2, norm_eps=1e-6).eval()
    for block in theirs.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    theirs.load_state_dict(diffusers_dit_state_dict(reference, depth), strict=True)

    steps = torch.tensor([0, 1, 10, 100, 500, 999])
    labels = torch.tensor([0, 207, 999, 1000, 3, 360])  # 1000: the null class
    x = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs(x, timestep=steps, class_labels=labels).sample
        batch = patchify(list(x), 2)
        out = torch.stack(unpatchify(ours(batch, steps.double() / T, labels), batch.sizes, 2))
    assert out.shape == expected.shape == (6, 8, 8, 8)  # eps and the variance values
    assert (out - expected).abs().max() <= 1e-5


# ------------------------------------------------------------------------------ DDPM / DDIM
def gaussian_eps_network(alphas_cumprod, learned_variance):
    """``E[eps | x_k]`` for x0 ~ N(MU, S^2): ``b (x - a MU) / (a^2 S^2 + b^2)``; with a
    learned variance, also a fixed v in (-1, 1) depending on x and k."""
    def network(x, k):
        abar = alphas_cumprod[k]
        a, b = abar.sqrt(), (1 - abar).sqrt()
        eps = b * (x - a * MU) / (a * a * S * S + b * b)
        if not learned_variance:
            return eps
        u = 0.5 * x + math.cos(k / 100)
        return torch.cat([eps, u / (1 + u.abs())], -1)  # softsign: in (-1, 1)
    return network


def float64_tables(scheduler):
    """diffusers builds its betas in float32; give it flexgen's float64 ones."""
    scheduler.betas = linear_betas(T)
    scheduler.alphas = 1.0 - scheduler.betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, 0)
    if hasattr(scheduler, 'final_alpha_cumprod'):
        scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return scheduler


def run_flexgen(sampler, transport, network, x, seed):
    gen = torch.Generator().manual_seed(seed)
    return sampler(lambda x, t: network(x, round(t * T)), transport, x.clone(),
                   noise_like=lambda x: torch.randn(x.shape, generator=gen, dtype=x.dtype))


def run_diffusers(scheduler, network, x, seed, **step_kwargs):
    gen = torch.Generator().manual_seed(seed)
    for k in scheduler.timesteps:
        x = scheduler.step(network(x, int(k)), k, x, generator=gen, **step_kwargs).prev_sample
    return x


def start_noise():
    return torch.randn(512, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize('variance', ['fixed_small', 'fixed_large', 'learned_range'])
@pytest.mark.parametrize('spec', ['250', '50', 'ddim50'])
def test_ddpm_ancestral_equals_diffusers_ddpm_scheduler(variance, spec):
    """Respaced steps as diffusers' custom timesteps; each side draws its step noise from
    a generator with the same seed (both draw at every step but the last)."""
    transport = TRANSPORTS.build(dict(type='DDPM', variance=variance))
    network = gaussian_eps_network(transport.schedule.alphas_cumprod,
                                   variance == 'learned_range')
    sampler = SAMPLERS.build(dict(type='DDPMAncestral', num_steps=spec))
    out = run_flexgen(sampler, transport, network, start_noise(), seed=1)
    scheduler = float64_tables(DDPMScheduler(
        num_train_timesteps=T, beta_schedule='linear', variance_type=variance,
        prediction_type='epsilon', clip_sample=False))
    scheduler.set_timesteps(timesteps=space_timesteps(T, spec)[::-1])
    expected = run_diffusers(scheduler, network, start_noise(), seed=1)
    assert (out - expected).abs().max() <= 1e-12
    assert abs(out.mean().item() - MU) < 0.1  # and it did sample the data


@pytest.mark.parametrize('eta', [0.0, 1.0])
@pytest.mark.parametrize('num_steps', [50, 250])
def test_ddim_equals_diffusers_ddim_scheduler(eta, num_steps):
    """ADM's 'ddimN' steps are diffusers' 'leading' spacing; diffusers also draws noise at
    the last step, where its scale is 0, so the draws before it line up."""
    transport = TRANSPORTS.build(dict(type='DDPM', variance='fixed_small'))
    network = gaussian_eps_network(transport.schedule.alphas_cumprod, False)
    sampler = SAMPLERS.build(dict(type='DDIM', num_steps=f'ddim{num_steps}', eta=eta))
    out = run_flexgen(sampler, transport, network, start_noise(), seed=1)
    scheduler = float64_tables(DDIMScheduler(
        num_train_timesteps=T, beta_schedule='linear', prediction_type='epsilon',
        clip_sample=False, set_alpha_to_one=True, steps_offset=0, timestep_spacing='leading'))
    scheduler.set_timesteps(num_steps)
    assert scheduler.timesteps.tolist() == space_timesteps(T, f'ddim{num_steps}')[::-1]
    expected = run_diffusers(scheduler, network, start_noise(), seed=1, eta=eta)
    assert (out - expected).abs().max() <= 1e-12


# ------------------------------------------------------------------------------ flow Euler
def gaussian_velocity(x, t):
    """The exact velocity of x_t = (1 - t) x0 + t eps for x0 ~ N(MU, S^2), evaluated in
    float32 at float32 t (so both sides see the same network)."""
    t = torch.tensor(float(t), dtype=torch.float32)
    a, var = 1 - t, (1 - t) ** 2 * S * S + t * t
    return t / var * (x - a * MU) - (MU + a * S * S / var * (x - a * MU))


@pytest.mark.parametrize('num_steps, shift', [(32, 1.0), (50, 1.0), (7, 3.0), (250, 0.3)])
def test_rectified_flow_euler_equals_diffusers_flow_match_euler(num_steps, shift):
    """flexgen's t (1 noise, 0 data) is diffusers' sigma (1 noise), and both integrate
    dx/dt = eps - x0 downwards: the grid goes in as ``sigmas`` unchanged (diffusers' shift
    is 1; it appends the final 0 itself). Bitwise equal in float32."""
    transport = TRANSPORTS.build(dict(type='RectifiedFlow'))
    sampler = SAMPLERS.build(dict(type='EulerODE', num_steps=num_steps, shift=shift))
    grid = sampler.times(transport)
    noise = torch.randn(512, 4, generator=torch.Generator().manual_seed(0))
    out = sampler(gaussian_velocity, transport, noise.clone())

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=1.0)
    scheduler.set_timesteps(sigmas=grid[:-1].tolist())
    assert torch.equal(scheduler.sigmas, grid.float())
    x = noise.clone()
    for i, k in enumerate(scheduler.timesteps):
        x = scheduler.step(gaussian_velocity(x, scheduler.sigmas[i]), k, x).prev_sample
    assert out.dtype == x.dtype == torch.float32
    assert torch.equal(out, x)
