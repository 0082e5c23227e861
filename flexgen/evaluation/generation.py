"""Generate a request set in shards that survive a kill; ADM's .npz and a table per size.

FID-50K takes hours on a GPU node, and a job that dies must not start over. The requests
(``GenerationRequests``: class-balanced, one seed per request) are cut into shards of
consecutive requests of one size. The unfinished shards are dealt to the processes
round-robin; each finished shard is written atomically (``atomic_write``) and a rerun
skips the shards already on disk. An image depends only on its request (label, size,
seed), and a shard is batched the same way whatever the number of processes, so one
process, N processes and any number of restarts give the same images.

Then rank 0 writes one ``samples_{H}x{W}.npz`` per size, the file ADM's evaluation suite
reads (``arr_0``: uint8 ``[N, H, W, 3]`` in request order; ``arr_1``: the labels), the
evaluator's metrics (FID, class accuracy, ...) are computed over the images of every
process, and a table with one row per size (aspect ratio, tokens, metrics, time) is
written as JSON and markdown (``metrics.json``, ``metrics.md``).

``out_dir`` holds::

    manifest.json      what the images depend on (model config, weights digest, requests,
                       precision, shard size); a rerun with other settings is refused
    shards/{H}x{W}_{start}_{stop}.npz   images, labels, indices, seconds (and the batch
                                        size, rank, world size) of one shard
    samples_{H}x{W}.npz                 ADM's format, one per size
    metrics.json, metrics.md            the metrics and the per-size table
"""
import io
import json
import math
import os
import os.path as osp
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from mmengine.dist import barrier, broadcast_object_list, get_dist_info
from mmengine.logging import print_log
from tqdm import tqdm

from flexgen.fileio import atomic_path, atomic_write, is_temporary
from flexgen.utils.tf32 import set_tf32_flags, tf32_flags

from .utils import hwc_uint8, size_key

MANIFEST = 'manifest.json'
SHARDS = 'shards'
PRECISIONS = ('fp32', 'tf32', 'bf16', 'fp16')


@dataclass(frozen=True)
class Shard:
    """Requests ``start .. stop - 1``, all of one ``size`` (H, W)."""
    start: int
    stop: int
    size: Tuple[int, int]

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def name(self) -> str:
        return f'{size_key(self.size)}_{self.start:07d}_{self.stop:07d}.npz'


def plan_shards(requests, shard_size: int) -> List[Shard]:
    """Consecutive requests of one size, at most ``shard_size`` per shard."""
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f'shard_size must be a positive int, got {shard_size!r}')
    if not hasattr(requests, 'get_size'):
        raise TypeError(f'{type(requests).__name__} has no get_size(index): sharded generation '
                        'needs a request set such as GenerationRequests as its dataset')
    shards, start = [], 0
    while start < len(requests):
        size = tuple(requests.get_size(start))
        stop = start + 1
        while stop < len(requests) and stop - start < shard_size \
                and tuple(requests.get_size(stop)) == size:
            stop += 1
        shards.append(Shard(start, stop, size))
        start = stop
    return shards


def tokens_per_image(model, size) -> Optional[int]:
    """Backbone tokens of one ``(H, W)`` image (``None`` if the model does not say)."""
    step = getattr(model, 'pixels_per_token', None)
    return None if step is None else (size[0] // step) * (size[1] // step)


def aspect_ratio(size) -> str:
    """``(H, W)`` as ``'H:W'`` in lowest terms, e.g. ``(224, 448) -> '1:2'``."""
    ratio = Fraction(int(size[0]), int(size[1]))
    return f'{ratio.numerator}:{ratio.denominator}'


def resolve_precision(precision: Optional[str], device: torch.device) -> str:
    """``precision``, or for ``None`` what the run is set to: ``'tf32'`` on CUDA with
    TF32 matmuls allowed (flexgen's TF32Hook, on by default), ``'fp32'`` otherwise."""
    if precision is None:
        tf32 = device.type == 'cuda' and torch.backends.cuda.matmul.allow_tf32
        return 'tf32' if tf32 else 'fp32'
    if precision not in PRECISIONS:
        raise ValueError(f'precision must be one of {PRECISIONS}, got {precision!r}')
    return precision


@contextmanager
def precision_context(precision: str, device: torch.device):
    """fp32 (TF32 off); tf32 (TensorFloat-32 matmuls and convolutions on CUDA, as DiT's
    sample_ddp.py); bf16 / fp16 autocast (TF32 as the run set it)."""
    precision = resolve_precision(precision, device)
    dtype = dict(bf16=torch.bfloat16, fp16=torch.float16).get(precision)
    if dtype is not None:
        with torch.autocast(device.type, dtype=dtype):
            yield
        return
    saved = tf32_flags()
    set_tf32_flags(precision == 'tf32', precision == 'tf32')
    try:
        yield
    finally:
        set_tf32_flags(*saved)


# --------------------------------------------------------------------- shard files
def _plain(obj):
    """``obj`` as JSON would read it back (tuples -> lists, other objects -> repr)."""
    return json.loads(json.dumps(obj, sort_keys=True, default=repr))


def _differences(old, new, path='') -> List[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f'{path}.{key}' if path else key)
        return out
    return [] if old == new else [f'{path}: {old!r} -> {new!r}']


def read_shard(out_dir: str, shard: Shard) -> Dict[str, np.ndarray]:
    """A finished shard's ``images`` (uint8 [n, H, W, 3]), ``labels``, ``indices``,
    ``seconds``; an error naming the file if it is not the shard it should be."""
    path = osp.join(out_dir, SHARDS, shard.name)
    try:
        with np.load(path) as data:
            out = {key: data[key] for key in data.files}
    except Exception as error:
        raise ValueError(f'shard {path} is unreadable ({error}); delete it to generate it '
                         'again') from error
    expected = np.arange(shard.start, shard.stop)
    images = out.get('images')
    if (images is None or images.shape != (len(shard), *shard.size, 3)
            or not np.array_equal(out.get('indices'), expected)):
        raise ValueError(f'shard {path} does not hold requests {shard.start}..{shard.stop - 1} '
                         f'at {size_key(shard.size)}; delete it to generate it again')
    return out


def shard_seconds(out_dir: str, shard: Shard) -> float:
    """The generation seconds a finished shard took (read without its images)."""
    with np.load(osp.join(out_dir, SHARDS, shard.name)) as data:
        return float(data['seconds'])


def generate_shard(model, requests, shard: Shard, batch_size: int, collate_fn: Callable,
                   precision: str, device: torch.device, progress=None) -> Dict:
    """Generate one shard through ``model.test_step`` (the test path: data preprocessor,
    model wrapper, ``predict``), ``batch_size`` requests at a time."""
    begin_time = time.perf_counter()
    images, labels = [], []
    for begin in range(shard.start, shard.stop, batch_size):
        indices = list(range(begin, min(begin + batch_size, shard.stop)))
        with precision_context(precision, device):
            outputs = model.test_step(collate_fn([requests[i] for i in indices]))
        got = [int(o['index']) for o in outputs]
        if got != indices:
            raise RuntimeError(f'generate_shard: the model returned requests {got[:4]}... for '
                               f'{indices[:4]}... (predict must keep the request order)')
        batch = torch.stack([o['image'].detach().float().cpu() for o in outputs])
        images.append(hwc_uint8(batch))
        labels += [int(o['label']) for o in outputs]
        if progress is not None:
            progress.update(len(indices))
    return dict(images=np.concatenate(images), labels=np.asarray(labels, dtype=np.int64),
                indices=np.arange(shard.start, shard.stop, dtype=np.int64),
                seconds=np.float64(time.perf_counter() - begin_time),
                batch_size=np.int64(batch_size))


def write_shard(out_dir: str, shard: Shard, data: Dict) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **data)
    atomic_write(buffer.getvalue(), osp.join(out_dir, SHARDS, shard.name))


def read_image(out_dir: str, size, k: int) -> np.ndarray:
    """Image ``k`` (uint8 ``[H, W, 3]``) of the requests of ``size`` in ``out_dir``, read
    from the one shard that holds it."""
    key, first = size_key(size), None
    names = sorted(n for n in os.listdir(osp.join(out_dir, SHARDS))
                   if n.startswith(key + '_') and n.endswith('.npz'))
    shards = [Shard(int(n.split('_')[1]), int(n.split('_')[2][:-4]), tuple(size))
              for n in names]
    if shards:
        first = shards[0].start
    for shard in shards:
        if shard.start <= first + k < shard.stop:
            return read_shard(out_dir, shard)['images'][first + k - shard.start]
    raise IndexError(f'{out_dir} holds no image {k} of size {key}')


def write_size_npz(out_dir: str, size, shards: Sequence[Shard]) -> str:
    """``samples_{H}x{W}.npz`` from the shards of one size, streamed shard by shard (50K
    images of 1024 px are 157 GB: never assembled in memory; numpy's savez cannot stream,
    so the .npz, a zip of .npy files, is written with zipfile and numpy's header)."""
    path = osp.join(out_dir, f'samples_{size_key(size)}.npz')
    count = sum(len(s) for s in shards)

    with atomic_path(path) as tmp, open(tmp, 'xb') as f:
        labels = []
        with zipfile.ZipFile(f, 'w', zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open('arr_0.npy', 'w', force_zip64=True) as member:
                np.lib.format.write_array_header_2_0(member, dict(
                    descr=np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                    fortran_order=False, shape=(count, *size, 3)))
                for shard in shards:
                    data = read_shard(out_dir, shard)
                    member.write(np.ascontiguousarray(data['images']).tobytes())
                    labels.append(data['labels'])
            with archive.open('arr_1.npy', 'w') as member:
                np.lib.format.write_array(member, np.concatenate(labels))
    return path


# --------------------------------------------------------------------- tables
def per_size_metrics(metrics: Dict, sizes: Sequence) -> Dict[str, Dict]:
    """``{'HxW': {name: value}}``: every metric ``name/HxW``; with a single size, every
    metric that has no size suffix too."""
    keys = [size_key(s) for s in sizes]
    table = {key: {} for key in keys}
    for name, value in metrics.items():
        head, _, tail = name.rpartition('/')
        if tail in table:
            table[tail][head] = value
        elif len(keys) == 1:
            table[keys[0]][name] = value
    return table


def _number(value):
    if isinstance(value, (float, np.floating)) and not math.isfinite(value):
        return None
    return value.item() if isinstance(value, np.generic) else value


def size_rows(metrics: Dict, sizes: Sequence, counts: Dict, seconds: Dict,
              tokens: Callable) -> List[Dict]:
    """One row per size: size, aspect ratio, tokens per image, images, the metrics of
    that size, generation seconds (summed over processes and runs)."""
    by_size = per_size_metrics(metrics, sizes)
    rows = []
    for size in sizes:
        key = size_key(size)
        row = dict(size=key, aspect=aspect_ratio(size), tokens=tokens(size),
                   images=int(counts[key]))
        row.update({name: _number(value) for name, value in by_size[key].items()})
        row['seconds'] = round(float(seconds[key]), 3)
        rows.append(row)
    return rows


def markdown_table(rows: List[Dict]) -> str:
    """Rows (dicts with the same keys) as a markdown table; floats with 4 significant
    digits, missing values as '-'."""
    if not rows:
        return ''
    columns = list(rows[0])
    for row in rows[1:]:
        columns += [c for c in row if c not in columns]

    def cell(value):
        if value is None:
            return '-'
        if isinstance(value, float):
            return f'{value:.4g}'
        return str(value)

    lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
    lines += ['| ' + ' | '.join(cell(row.get(c)) for c in columns) + ' |' for row in rows]
    return '\n'.join(lines) + '\n'


def write_table_files(stem: str, rows: List[Dict], metrics: Dict, **extra) -> None:
    """``{stem}.json`` (the rows, every metric, ``extra``) and ``{stem}.md`` (the rows)."""
    payload = dict(rows=rows, metrics={k: _number(v) for k, v in metrics.items()}, **extra)
    atomic_write(json.dumps(payload, indent=1, default=repr).encode(), f'{stem}.json')
    atomic_write(markdown_table(rows).encode(), f'{stem}.md')


# --------------------------------------------------------------------- the run
def _prepare(out_dir: str, manifest: Dict, shards: List[Shard]):
    """Rank 0: check or write the manifest, drop leftovers of killed writes, list the
    unfinished shards. Returns ``(error message or None, unfinished shard ids)``."""
    os.makedirs(osp.join(out_dir, SHARDS), exist_ok=True)
    path = osp.join(out_dir, MANIFEST)
    if osp.isfile(path):
        with open(path) as f:
            old = json.load(f)
        changes = _differences(old, manifest)
        if changes:
            return (f'{out_dir} holds samples made with other settings ({MANIFEST}): '
                    + '; '.join(changes[:8]) + (' ...' if len(changes) > 8 else '')
                    + '. Use another output folder, or delete this one.'), []
    else:
        atomic_write(json.dumps(manifest, indent=1, sort_keys=True).encode(), path)
    shard_dir = osp.join(out_dir, SHARDS)
    for name in os.listdir(shard_dir):
        if is_temporary(name):
            os.remove(osp.join(shard_dir, name))
    return None, [i for i, s in enumerate(shards) if not osp.isfile(osp.join(shard_dir, s.name))]


def _evaluate(evaluator, out_dir: str, shards: List[Shard], batch_size: int):
    """Feed every image to the evaluator, request ``i`` on rank ``i % world`` (mmengine's
    ``collect_results`` interleaves the ranks' results in that order; the ranks short of
    one image repeat request 0, which ``evaluate(total)`` drops), and evaluate."""
    rank, world = get_dist_info()
    total = sum(len(s) for s in shards)
    pending, padding = [], None

    def flush():
        if pending:
            evaluator.process(data_samples=list(pending), data_batch=None)
            pending.clear()

    for shard in shards:
        data = None
        for position in range(shard.start, shard.stop):
            if position == 0 or position % world == rank:
                data = data if data is not None else read_shard(out_dir, shard)
                k = position - shard.start
                sample = dict(image=torch.from_numpy(data['images'][k]).permute(2, 0, 1)
                              .float() / 255, label=int(data['labels'][k]), index=position,
                              size=shard.size)
                if position == 0:
                    padding = sample
                if position % world == rank:
                    pending.append(sample)
                    if len(pending) == batch_size:
                        flush()
    if total % world and rank >= total % world:
        pending.append(padding)
    flush()
    return evaluator.evaluate(total)


def run_generation(model, requests, out_dir: str, manifest: Dict, *, collate_fn: Callable,
                   batch_size: int, shard_size: int = 256, precision: Optional[str] = None,
                   evaluator=None, npz: bool = True, tokens: Optional[Callable] = None,
                   device: Optional[torch.device] = None, progress: bool = True) -> Dict:
    """Generate ``requests`` into ``out_dir`` (resuming), write the per-size .npz, evaluate
    and write the per-size table. Every rank calls it with the same arguments.

    Args:
        model: has ``test_step(batch)`` returning ``dict(image [3, H, W] in [0, 1], label,
            index)`` per request (a ``DiffusionGenerator``, wrapped or not).
        requests: e.g. ``GenerationRequests``; ``collate_fn`` batches its items.
        manifest: what the images depend on; must equal the folder's ``manifest.json``.
        batch_size: requests per ``test_step`` (per process).
        evaluator: an mmengine ``Evaluator`` (or ``None``) scoring every image.
        tokens: ``size -> tokens per image`` for the table.

    Returns ``dict(metrics, rows, out_dir)``.
    """
    rank, world = get_dist_info()
    device = device or torch.device('cpu')
    precision = resolve_precision(precision, device)
    shards = plan_shards(requests, shard_size)
    manifest = _plain(dict(manifest, shard_size=shard_size, precision=precision))
    message = [None, []]
    if rank == 0:
        message = list(_prepare(out_dir, manifest, shards))
    if world > 1:
        broadcast_object_list(message)
    error, missing = message
    if error is not None:
        raise ValueError(error)
    mine = missing[rank::world]
    done = len(shards) - len(missing)
    print_log(f'Generation in {out_dir}: {len(shards)} shards of <= {shard_size} requests, '
              f'{done} on disk, {len(missing)} to generate on {world} process(es)',
              logger='current')
    bar = tqdm(total=sum(len(shards[i]) for i in mine), unit='img', dynamic_ncols=True,
               desc=f'generating (rank 0 of {world})' if world > 1 else 'generating',
               disable=not progress or rank != 0 or not mine)
    with bar:
        for i in mine:
            data = generate_shard(model, requests, shards[i], batch_size, collate_fn,
                                  precision, device, bar)
            data.update(rank=np.int64(rank), world_size=np.int64(world))
            write_shard(out_dir, shards[i], data)
    if world > 1:
        barrier()

    sizes = list(dict.fromkeys(s.size for s in shards))
    by_size = {size: [s for s in shards if s.size == size] for size in sizes}
    if npz and rank == 0:
        for size, group in by_size.items():
            path = osp.join(out_dir, f'samples_{size_key(size)}.npz')
            newest = max(os.stat(osp.join(out_dir, SHARDS, s.name)).st_mtime_ns for s in group)
            if osp.isfile(path) and os.stat(path).st_mtime_ns >= newest:
                continue  # written from these very shards by an earlier run
            write_size_npz(out_dir, size, group)
            print_log(f'{sum(len(s) for s in group)} samples of {size_key(size)} -> {path}',
                      logger='current')
    metrics = {}
    if evaluator is not None and len(getattr(evaluator, 'metrics', [])) > 0:
        metrics = _evaluate(evaluator, out_dir, shards, batch_size)
    if rank == 0:
        seconds = {size_key(size): sum(shard_seconds(out_dir, s) for s in group)
                   for size, group in by_size.items()}
        counts = {size_key(size): sum(len(s) for s in group) for size, group in by_size.items()}
        rows = size_rows(metrics, sizes, counts, seconds, tokens or (lambda size: None))
        write_table_files(osp.join(out_dir, 'metrics'), rows, metrics, manifest=manifest)
        print_log('Per-size results (' + osp.join(out_dir, 'metrics.md') + '):\n'
                  + markdown_table(rows), logger='current')
    else:
        rows = None
    if world > 1:
        holder = [rows]
        broadcast_object_list(holder)
        rows = holder[0]
        barrier()
    return dict(metrics=metrics, rows=rows, out_dir=out_dir)
