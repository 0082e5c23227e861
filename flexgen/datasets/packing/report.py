"""How full each packer fills its packs on a size histogram (``tools/pack_dataset.py
--report``)."""
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np
from tqdm import tqdm

from .lengths import lengths_from_histogram, load_size_histogram
from .lpfhp import lpfhp, strategies_efficiency
from .online import OnlinePlan, best_fit_stream, choose_fill, default_chunk_packs


def online_epoch(plan: OnlinePlan, epoch: int = 0) -> Dict[str, float]:
    """Pack a whole epoch of ``plan``: tokens used over tokens budgeted, images left out,
    and the fullest and emptiest pack (in tokens)."""
    used, left_out, fullest, emptiest = 0, 0, 0, plan.max_len
    for chunk in range(plan.num_chunks):
        packs, left = plan.chunk(epoch, chunk)
        loads = [int(plan.lengths[pack].sum()) if pack else 0 for pack in packs]
        used, left_out = used + sum(loads), left_out + len(left)
        fullest, emptiest = max(fullest, max(loads)), min(emptiest, min(loads))
    return dict(efficiency=used / (plan.packs_per_epoch * plan.max_len), left_out=left_out,
                fullest=fullest, emptiest=emptiest)


def packing_report(histogram_path: str, lengths: Sequence[int] = (8192, 16384, 65536),
                   kinds: Optional[Sequence[str]] = None, chunk_packs: Optional[int] = None,
                   packs_per_step: int = 1, stream_buffer: int = 256, seed: int = 0,
                   stream: bool = True, verbose: bool = True) -> List[dict]:
    """Real tokens over budgeted tokens of each packer on a size histogram, per budget L.

    - offline: LPFHP over the whole histogram (:func:`lpfhp`);
    - online: :class:`OnlinePlan` with the fill :func:`choose_fill` picks, steps of
      ``packs_per_step`` packs (W ranks x P packs per rank), chunks of ``chunk_packs`` packs
      (default :func:`default_chunk_packs`), packed for one whole epoch (``left out``:
      images the chunk packer could not place; ``min..max``: the emptiest and fullest pack);
    - stream: :func:`best_fit_stream` with a ``stream_buffer``-image buffer (the packer of
      ``TokenBudgetBatchSampler``), over the same shuffled images.

    Returns one dict per budget; with ``verbose``, shows a progress bar (stderr) while it
    packs (a minute on the 3.8M-image default histogram) and prints the table and a legend
    of its columns.
    """
    histogram = load_size_histogram(histogram_path, kinds)
    all_lengths = lengths_from_histogram(histogram)
    rows = []
    bar = tqdm(total=len(lengths) * (3 if stream else 2), unit='stage', file=sys.stderr,
               disable=not verbose, dynamic_ncols=True)
    for max_len in lengths:
        bar.set_description(f'L={max_len}: offline LPFHP, online fill')
        strategies = lpfhp(histogram, max_len)
        chunk_steps = max(1, (chunk_packs or default_chunk_packs(max_len)) // packs_per_step)
        plan = choose_fill(all_lengths, np.arange(len(all_lengths)), max_len, packs_per_step,
                           chunk_steps, seed)
        bar.update(1)
        bar.set_description(f'L={max_len}: online epoch')
        online = online_epoch(plan)
        bar.update(1)
        row = dict(max_len=max_len, images=len(all_lengths),
                   offline=strategies_efficiency(strategies, max_len),
                   offline_packs=sum(c for c, _ in strategies), online=online['efficiency'],
                   online_fill=plan.fill, online_left_out=online['left_out'],
                   online_packs=plan.packs_per_epoch, online_fullest=online['fullest'],
                   online_emptiest=online['emptiest'])
        if stream:
            bar.set_description(f'L={max_len}: stream')
            order, _ = plan.epoch_order(0)
            packs = best_fit_stream(order.tolist(), all_lengths.tolist(), max_len,
                                    stream_buffer)
            row['stream'] = float(all_lengths.sum()) / (len(packs) * max_len)
            bar.update(1)
        rows.append(row)
    bar.close()
    if verbose:
        print(f'Packing efficiency (real tokens / budgeted tokens) on {histogram_path}, '
              f'kinds {", ".join(kinds) if kinds else "all"}: {len(all_lengths)} images')
        print(f'{"L":>6} | {"offline LPFHP":>13} {"packs":>7} | {"online":>8} {"fill":>7} '
              f'{"left out":>8} {"min..max pack":>13} | {"stream":>8}')
        for r in rows:
            print(f'{r["max_len"]:>6} | {r["offline"]:>13.3%} {r["offline_packs"]:>7} | '
                  f'{r["online"]:>8.3%} {r["online_fill"]:>7.4f} {r["online_left_out"]:>8} '
                  f'{r["online_emptiest"]:>6}..{r["online_fullest"]:<6} | '
                  f'{r.get("stream", float("nan")):>8.3%}')
        chunk = f'{chunk_packs} packs' if chunk_packs else 'default_chunk_packs(L)'
        print(f"""Columns (efficiency = real tokens / (packs x L)):
  L              the token budget of a pack
  offline LPFHP  efficiency of LPFHP over the whole histogram (the packs pack_dataset.py writes
                 for OfflinePackSampler); packs: how many it makes
  online         efficiency of OnlinePackSampler's chunk packer over one shuffled epoch
                 ({packs_per_step} pack(s) per step, chunks of {chunk}); fill: the highest
                 average share of L its packs aim for; left out: images it could not place in
                 that epoch; min..max pack: tokens in its emptiest and fullest pack
  stream         efficiency of TokenBudgetBatchSampler's best-fit packer ({stream_buffer}-image
                 buffer) over the same shuffled images""")
    return rows
