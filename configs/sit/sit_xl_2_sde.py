# SiT-XL/2 sampled as in the paper's best result (FID-50K 2.06, guidance 1.5): SiT's
# `sample.py SDE` sampler, Euler-Maruyama over 250 steps with diffusion w(t) = sigma_t and
# a deterministic "Mean" last step from t = 0.04 (SiT's command-line defaults).
_base_ = './sit_xl_2.py'

model = dict(sampler=dict(_delete_=True, type='EulerMaruyamaSDE', num_steps=250,
                          diffusion_form='sigma', diffusion_norm=1.0, last_step='Mean',
                          last_step_size=0.04))
