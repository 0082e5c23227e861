"""Write generated samples to disk for an external evaluator.

DiT, SiT, FiT and NiT report FID-50K with ADM's evaluation suite (Dhariwal & Nichol 2021,
``guided-diffusion/evaluations``), which reads one ``.npz`` of ``uint8 [N, H, W, 3]``
images. ``SampleWriter`` is that step as an mmengine metric: every rank writes its images
as PNGs named by request index (so the set is the same for any batch size or process
count); ``compute_metrics`` (rank 0) packs all of them into ``samples.npz`` when they share
one size, which the ADM suite and torch-fidelity read.
"""
import io
import os.path as osp
from typing import Optional, Sequence

import numpy as np
from mmengine.dist import get_dist_info
from mmengine.evaluator import BaseMetric
from mmengine.logging import print_log

from flexgen.fileio import atomic_write
from flexgen.registry import METRICS
from flexgen.utils.images import save_png


@METRICS.register_module()
class SampleWriter(BaseMetric):
    """Args:
        out_dir: folder of ``{index:06d}_{label}.png`` files and ``samples.npz``; ``None``
            under ``GenerationLoop`` puts them in ``<its output folder>/png``.
        npz: also write ``samples.npz`` (all images of one size) at the end.
    """

    default_prefix = 'samples'

    def __init__(self, out_dir: Optional[str] = None, npz: bool = True,
                 collect_device: str = 'cpu', prefix=None):
        super().__init__(collect_device=collect_device, prefix=prefix)
        self.out_dir, self.npz = out_dir, npz

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        if self.out_dir is None:
            raise ValueError('SampleWriter: out_dir is not set; give test_evaluator.out_dir, '
                             "or test with test_cfg=dict(type='GenerationLoop'), which puts "
                             'the PNGs in its output folder')
        for sample in data_samples:
            name = f"{int(sample['index']):06d}_{int(sample['label'])}.png"
            save_png(sample['image'], osp.join(self.out_dir, name))
            self.results.append(name)

    def compute_metrics(self, results: list) -> dict:
        from PIL import Image
        names = sorted(results)
        rank, _ = get_dist_info()
        if self.npz and names and rank == 0:
            images = [np.asarray(Image.open(osp.join(self.out_dir, n)).convert('RGB'))
                      for n in names]
            if len({im.shape for im in images}) == 1:
                path = osp.join(self.out_dir, 'samples.npz')
                buffer = io.BytesIO()
                np.savez(buffer, arr_0=np.stack(images))
                atomic_write(buffer.getvalue(), path)
                print_log(f'SampleWriter: {len(images)} samples -> {path}', logger='current')
            else:
                print_log('SampleWriter: samples of several sizes, no samples.npz (PNGs only)',
                          logger='current', level=30)
        return dict(count=len(names))
