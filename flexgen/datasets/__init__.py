"""Datasets, collate functions and data samplers (importing this registers them)."""
from .base_dataset import FlexDataset, IndexedDataset
from .base_sampler import GlobalBatchSampler
from .batch_samplers import BucketBatchSampler, TokenBudgetBatchSampler
from .collate import jagged_collate
from .fit_latents import FiTFileError, FiTLatents, FiTLatentWriter
from .generation_requests import GenerationRequests
from .image_folder import ImageFolder
from .latent_writer import LatentWriter
from .nit_latents import NiTFileError, NiTLatents, NiTLatentWriter
from .pack_samplers import OfflinePackSampler, OnlinePackSampler
from .packing import lpfhp, packing_report
from .shapes import SHAPES, ProceduralShapes

__all__ = ['FlexDataset', 'IndexedDataset', 'GlobalBatchSampler', 'BucketBatchSampler',
           'TokenBudgetBatchSampler', 'jagged_collate', 'FiTFileError', 'FiTLatents',
           'FiTLatentWriter', 'GenerationRequests', 'ImageFolder', 'LatentWriter',
           'NiTFileError', 'NiTLatents', 'NiTLatentWriter', 'OfflinePackSampler',
           'OnlinePackSampler', 'lpfhp', 'packing_report', 'ProceduralShapes', 'SHAPES']
