# DiT-XL/2 at 512x512: the 256 model's network on 64x64 latents (1024 tokens), trained
# from scratch for 3M steps with the same hyper-parameters (Peebles & Xie 2023, section
# 5.1): FID-50K 3.04 with guidance 1.5. DiT-XL-2-512x512.pt loads as the 256 one does.
_base_ = './dit_xl_2_256.py'

_resolution = 512
train_dataloader = dict(dataset=dict(resolution=_resolution))
test_dataloader = dict(dataset=dict(sizes=[(_resolution, _resolution)]))
test_evaluator = dict(reference='data/adm_reference/VIRTUAL_imagenet512.npz')
train_cfg = dict(max_iters=3_000_000)
