from .batch_samplers import BucketBatchSampler, TokenBudgetBatchSampler
from .collate import jagged_collate
from .generation_requests import GenerationRequests
from .shapes import ProceduralShapes

__all__ = ['BucketBatchSampler', 'TokenBudgetBatchSampler', 'jagged_collate',
           'GenerationRequests', 'ProceduralShapes']
