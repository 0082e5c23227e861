"""Datasets, collate functions and batch samplers (importing this registers them)."""
from .batch_samplers import BucketBatchSampler, TokenBudgetBatchSampler
from .collate import jagged_collate, padded_collate
from .fit_latents import FiTFileError, FiTLatents
from .generation_requests import GenerationRequests
from .image_folder import ImageFolder
from .nit_latents import NiTFileError, NiTLatents
from .shapes import SHAPES, ProceduralShapes

__all__ = ['BucketBatchSampler', 'TokenBudgetBatchSampler', 'jagged_collate', 'padded_collate',
           'FiTFileError', 'FiTLatents', 'GenerationRequests', 'ImageFolder', 'NiTFileError', 'NiTLatents',
           'ProceduralShapes', 'SHAPES']
