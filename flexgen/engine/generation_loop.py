"""The test loop of a generator: sharded, resumable generation of the test requests, then
the evaluator and a per-size table (``flexgen.evaluation.generation``)."""
import hashlib
import inspect
import json
import os.path as osp
from typing import Optional, Sequence

from mmengine.dist import broadcast_object_list, get_dist_info
from mmengine.model import is_model_wrapper
from mmengine.runner import BaseLoop

from flexgen.evaluation.generation import (PRECISIONS, resolve_precision, run_generation,
                                           tokens_per_image)
from flexgen.evaluation.utils import state_dict_digest
from flexgen.registry import GUIDANCE, LOOPS


def _unwrap(model):
    return model.module if is_model_wrapper(model) else model


def _as_dict(cfg) -> dict:
    return cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg)


def weights_digest(model) -> str:
    """The digest of the weights in use (every rank calls it: gathering sharded weights
    is a collective)."""
    return state_dict_digest(_unwrap(model).state_dict())


def generation_manifest(model_cfg, dataset_cfg, weights: str) -> dict:
    """What generated images depend on: the model config (network, transport, sampler,
    guidance, autoencoder), the :func:`weights_digest` and the request set. (The shard
    size and precision are added by ``run_generation``.)"""
    return dict(model=_as_dict(model_cfg), requests=_as_dict(dataset_cfg), weights=weights)


def check_sizes(model, sizes) -> None:
    """Every ``(H, W)`` is divisible by the model's pixels per token (autoencoder
    downsampling x patch size): refused before anything is generated, not at that size."""
    step = getattr(model, 'pixels_per_token', 1)
    bad = sorted({tuple(size) for size in sizes if size[0] % step or size[1] % step})
    if bad:
        raise ValueError(f'sizes {[f"{h}x{w}" for h, w in bad]} are not divisible by {step} '
                         '(autoencoder downsampling x patch size)')


def default_out_dir(root: str, manifest: dict) -> str:
    """``root/<12 hex digits of the manifest>``: the same settings find their earlier
    shards; other settings get a folder of their own."""
    text = json.dumps(manifest, sort_keys=True, default=repr)
    return osp.join(root, hashlib.sha256(text.encode()).hexdigest()[:12])


@LOOPS.register_module()
class GenerationLoop(BaseLoop):
    """Generates every request of the test set in resumable shards, writes ADM's .npz per
    size, scores the images with the test evaluator and writes the per-size table
    (size, aspect ratio, tokens, metrics, time) as ``metrics.json`` and ``metrics.md``.

    The per-process batch is ``test_dataloader.batch_size``; the requests come from
    ``test_dataloader.dataset`` (``GenerationRequests``) and are batched with its
    ``collate_fn``. Weights are those the test hooks put in place (an ``EMAHook`` swaps in
    the EMA weights).

    Args:
        out_dir: the output folder; default ``work_dir/samples/<hash of the settings>``
            (a rerun with the same settings resumes there). A folder made with other
            settings is refused.
        shard_size: requests per shard (the unit of resumption).
        precision: ``'fp32'`` (TF32 off), ``'tf32'``, ``'bf16'`` or ``'fp16'`` (autocast);
            ``None``: as the run is set (TF32 on CUDA under flexgen's default TF32Hook).
        npz: write ``samples_{H}x{W}.npz`` per size.
        progress: a tqdm bar with ETA on rank 0 (over the images still to generate; the
            batch bar of ``ProgressBarHook`` stands aside).
    """

    reports_progress = True

    def __init__(self, runner, dataloader, evaluator, out_dir: Optional[str] = None,
                 shard_size: int = 256, precision: Optional[str] = None, npz: bool = True,
                 progress: bool = True):
        super().__init__(runner, dataloader)
        self.evaluator = runner.build_evaluator(evaluator) \
            if isinstance(evaluator, (dict, list)) else evaluator
        if precision is not None and precision not in PRECISIONS:
            raise ValueError(f'GenerationLoop: precision must be one of {PRECISIONS}, '
                             f'got {precision!r}')
        dataset = self.dataloader.dataset
        if not hasattr(dataset, 'get_size'):
            raise TypeError(f'GenerationLoop: test_dataloader.dataset is '
                            f'{type(dataset).__name__}; it needs a request set with '
                            'get_size(index), e.g. GenerationRequests')
        if hasattr(dataset, 'metainfo') and self.evaluator is not None:
            self.evaluator.dataset_meta = dataset.metainfo
        self.out_dir, self.shard_size, self.precision = out_dir, shard_size, precision
        self.npz, self.progress = npz, progress

    def run(self) -> dict:
        self.runner.call_hook('before_test')
        self.runner.call_hook('before_test_epoch')
        self.runner.model.eval()
        result = self.generate(self.dataloader.dataset, self.runner.cfg.model,
                               self.runner.cfg.test_dataloader.dataset, self.out_dir)
        metrics = result['metrics']
        self.runner.call_hook('after_test_epoch', metrics=metrics)
        self.runner.call_hook('after_test')
        return metrics

    def generate(self, requests, model_cfg, requests_cfg, out_dir: Optional[str] = None,
                 weights: Optional[str] = None) -> dict:
        """Generate ``requests`` with the runner's model (whose config, as far as the
        images are concerned, is ``model_cfg``; ``weights`` its :func:`weights_digest`,
        computed here if not given) into ``out_dir`` (default
        ``work_dir/samples/<hash of the settings>``), evaluate, write the table."""
        runner = self.runner
        model = _unwrap(runner.model)
        check_sizes(model, {tuple(requests.get_size(i)) for i in range(len(requests))})
        _, world = get_dist_info()
        device = next(model.parameters()).device
        precision = resolve_precision(self.precision, device)
        manifest = generation_manifest(model_cfg, requests_cfg,
                                       weights or weights_digest(runner.model))
        # Rank 0's folder is everyone's.
        holder = [out_dir or default_out_dir(osp.join(runner.work_dir, 'samples'), dict(
            manifest, shard_size=self.shard_size, precision=precision))]
        if world > 1:
            broadcast_object_list(holder)
        out_dir = holder[0]
        # Metrics that write files (SampleWriter) and were given no folder write into this
        # run's output folder.
        if not hasattr(self, '_folderless'):
            self._folderless = [m for m in getattr(self.evaluator, 'metrics', [])
                                if hasattr(m, 'out_dir') and m.out_dir is None]
        for metric in self._folderless:
            metric.out_dir = osp.join(out_dir, 'png')
        return run_generation(
            runner.model, requests, out_dir, manifest, collate_fn=self.dataloader.collate_fn,
            batch_size=self.dataloader.batch_size, shard_size=self.shard_size,
            precision=precision, evaluator=self.evaluator, npz=self.npz,
            tokens=lambda size: tokens_per_image(model, size), device=device,
            progress=self.progress)


def apply_generation_options(cfg, *, sizes: Optional[Sequence] = None,
                             num_samples: Optional[int] = None,
                             batch_size: Optional[int] = None, out_dir: Optional[str] = None,
                             cfg_scale: Optional[float] = None,
                             cfg_interval: Optional[Sequence[float]] = None,
                             sampler: Optional[str] = None, steps: Optional[int] = None,
                             precision: Optional[str] = None, shard_size: Optional[int] = None,
                             guidance_type: Optional[str] = None):
    """Fold the usual evaluation options into a config (``None`` leaves a setting alone):
    sizes ``(H, W)`` and images per size of the requests, per-process batch, output
    folder, guidance scale / interval, sampler type and steps, precision, shard size.

    ``guidance_type`` (e.g. ``'ClassifierFreeGuidance'``) is the guidance that
    ``cfg_scale`` / ``cfg_interval`` ask for: a configured guidance of another type gives
    way to it, keeping its ``scale``, ``interval`` and ``channels`` (those of the config,
    else its type's defaults), and a config without guidance gets one (its type's default
    scale when only ``cfg_interval`` is given). ``None``: they edit the configured guidance,
    whatever its type. Returns ``cfg``."""
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f'--precision must be one of {PRECISIONS}, got {precision!r}')
    loop_options = dict(out_dir=out_dir, precision=precision, shard_size=shard_size)
    if any(v is not None for v in loop_options.values()):
        test_cfg = cfg.get('test_cfg') or {}
        loop = LOOPS.get(test_cfg['type']) if test_cfg.get('type') else None
        if not (isinstance(loop, type) and issubclass(loop, GenerationLoop)):
            raise ValueError(f'--out-dir / --precision / --shard-size need '
                             f"test_cfg=dict(type='GenerationLoop'); the config has "
                             f'test_cfg={test_cfg!r}')
        test_cfg.update({k: v for k, v in loop_options.items() if v is not None})
    if num_samples is not None or sizes is not None:
        dataset = (cfg.get('test_dataloader') or {}).get('dataset') or {}
        if dataset.get('type') != 'GenerationRequests':
            raise ValueError(f"--num-samples / --sizes need test_dataloader.dataset of type "
                             f"'GenerationRequests', got {dataset.get('type')!r}")
        if num_samples is not None:
            dataset.pop('num_per_class', None)
            dataset.num_samples = int(num_samples)
        if sizes is not None:
            dataset.sizes = [tuple(int(x) for x in size) for size in sizes]
    if batch_size is not None:
        cfg.test_dataloader.batch_size = int(batch_size)
    model = cfg.model
    if cfg_scale is not None or cfg_interval is not None:
        guidance = model.get('guidance')
        if guidance is None:
            if cfg_scale is None and guidance_type is None:
                raise ValueError('--cfg-interval: the config has no guidance '
                                 '(model.guidance=None); give --cfg-scale too')
            model.guidance = dict(type=guidance_type or 'ClassifierFreeGuidance')
        elif guidance_type is not None:
            configured = GUIDANCE.get(guidance.get('type'))
            if configured is not GUIDANCE.get(guidance_type):
                defaults = {name: p.default for name, p in
                            inspect.signature(configured).parameters.items()
                            if p.default is not inspect.Parameter.empty}
                shared = {key: guidance.get(key, defaults.get(key))
                          for key in ('scale', 'interval', 'channels')
                          if key in guidance or key in defaults}
                model.guidance = dict(type=guidance_type, **shared)
        if cfg_scale is not None:
            model.guidance.scale = float(cfg_scale)
        if cfg_interval is not None:
            if len(cfg_interval) != 2:
                raise ValueError(f'--cfg-interval takes LOW HIGH, got {cfg_interval!r}')
            model.guidance.interval = tuple(float(v) for v in cfg_interval)
    if sampler is not None and sampler != model.sampler.get('type'):
        # Another sampler type takes other arguments: start from its defaults.
        model.sampler = dict(type=sampler)
    if steps is not None:
        current = model.sampler.get('num_steps')
        # DDPM respacing specs are strings ('250'); keep the config's kind.
        model.sampler.num_steps = str(steps) if isinstance(current, str) else int(steps)
    return cfg
