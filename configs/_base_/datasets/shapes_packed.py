# The embedded demo shapes (configs/_base_/datasets/shapes.py) served NiT's way: each step
# one pack of images of any sizes whose tokens fill a budget (OnlinePackSampler: packed on
# the fly from a seeded order, equally full packs, every image once per epoch, resumable
# by arithmetic). With patch 2 the six sizes are 64 to 144 tokens, so a 1024-token pack
# holds about 9 images of mixed sizes and aspect ratios.
_base_ = ['./shapes.py']

train_dataloader = dict(
    batch_size=1,  # packs per process and step
    batch_sampler=dict(_delete_=True, type='OnlinePackSampler', max_tokens=1024,
                       patch_size=2),
    collate_fn=dict(patch_size=2))  # patchified in the collate, as NiT's ImageNet packs
