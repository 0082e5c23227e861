# NiT-XL's released weights at the twelve resolutions of NiT's table in one run of
# tools/test.py, with one sampler for all: Euler ODE, 50 steps, guidance 3.0 for
# t in [0, 0.7] (flexgen time, t = 1 noise). NiT's own numbers come from a guidance scale
# and interval chosen per size (and the SDE at 256 and 512): the README's recipes run
# nit_xl_official.py once per size with those settings. Sides are multiples of 32 (the
# DC-AE): the paper's "432 x 768" is 416 x 768 (NiT issue #13). Every size gets
# samples_{H}x{W}.npz and the Inception metrics (256 x 256 against ADM's 256 reference
# batch, the others against the 512 one); metrics.json / metrics.md hold the table.
#
#   torchrun --nproc_per_node 8 tools/test.py configs/nit/nit_xl_official_multires.py \
#       model_1000K.safetensors --launcher pytorch --precision bf16 --num-samples 10000
_base_ = ['./nit_xl_official.py']

model = dict(sampler=dict(_delete_=True, type='EulerODE', num_steps=50),
             guidance=dict(scale=3.0, interval=(0.0, 0.7)))
test_dataloader = dict(dataset=dict(sizes=[
    (256, 256), (512, 512), (768, 768), (1024, 1024), (1536, 1536), (2048, 2048),
    (320, 960), (416, 768), (480, 640), (640, 480), (768, 416), (960, 320)]))
