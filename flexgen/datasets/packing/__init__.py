"""Sequence packing: which images share a token budget. One module per job:

- :mod:`.lengths`: token counts of images, length histograms, the oversize policy;
- :mod:`.lpfhp`: offline longest-pack-first histogram packing (NiT's LPFHP);
- :mod:`.sampler_meta`: NiT's sampler-meta files (the offline packs on disk);
- :mod:`.online`: the online packers (the chunk packer of ``OnlinePackSampler`` and the
  automatic choice of its fill; the streaming best fit of ``TokenBudgetBatchSampler``);
- :mod:`.report`: the efficiency of each packer on a size histogram.
"""
from .lengths import (OVERSIZE_POLICIES, check_oversize_policy, data_meta_lengths,
                      dataset_sizes, dataset_token_counts, find_oversize, kept_mask,
                      length_histogram, lengths_from_histogram, load_size_histogram,
                      token_counts)
from .lpfhp import Strategy, assign_indices, lpfhp, pack_offline, strategies_efficiency
from .online import (CHUNK_TOKENS, FILL_SLACKS, OnlinePlan, best_fit_stream, choose_fill,
                     default_chunk_packs, fill_packs)
from .report import online_epoch, packing_report
from .sampler_meta import (check_sampler_meta, load_sampler_meta, sampler_meta_path,
                           save_sampler_meta)

__all__ = ['OVERSIZE_POLICIES', 'check_oversize_policy', 'data_meta_lengths',
           'dataset_sizes', 'dataset_token_counts', 'find_oversize', 'kept_mask',
           'length_histogram', 'lengths_from_histogram', 'load_size_histogram', 'token_counts',
           'Strategy',
           'assign_indices', 'lpfhp', 'pack_offline', 'strategies_efficiency', 'CHUNK_TOKENS',
           'FILL_SLACKS', 'OnlinePlan', 'best_fit_stream', 'choose_fill',
           'default_chunk_packs', 'fill_packs', 'online_epoch', 'packing_report',
           'check_sampler_meta', 'load_sampler_meta', 'sampler_meta_path', 'save_sampler_meta']
