"""Datasets, collate functions and batch samplers (importing this registers them)."""
from .batch_samplers import BucketBatchSampler, TokenBudgetBatchSampler
from .collate import jagged_collate
from .generation_requests import GenerationRequests
from .shapes import SHAPES, ProceduralShapes

__all__ = ['BucketBatchSampler', 'TokenBudgetBatchSampler', 'jagged_collate',
           'GenerationRequests', 'ProceduralShapes', 'SHAPES']
