"""Datasets, collate functions and batch samplers (importing this registers them)."""
from .base_dataset import FlexDataset
from .batch_samplers import BucketBatchSampler, TokenBudgetBatchSampler
from .collate import jagged_collate
from .fit_latents import FiTFileError, FiTLatents
from .generation_requests import GenerationRequests
from .image_folder import ImageFolder
from .nit_latents import NiTFileError, NiTLatents
from .pack_samplers import OfflinePackSampler, OnlinePackSampler
from .packing import lpfhp, packing_report
from .shapes import SHAPES, ProceduralShapes

__all__ = ['FlexDataset', 'BucketBatchSampler', 'TokenBudgetBatchSampler', 'jagged_collate',
           'FiTFileError', 'FiTLatents', 'GenerationRequests', 'ImageFolder', 'NiTFileError', 'NiTLatents',
           'OfflinePackSampler', 'OnlinePackSampler', 'lpfhp', 'packing_report',
           'ProceduralShapes', 'SHAPES']
