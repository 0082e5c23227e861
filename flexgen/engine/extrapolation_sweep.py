"""The RoPE extrapolation sweep: every rule, with and without decoupled axes, at every size.

FiT and NiT choose a RoPE extrapolation rule per target resolution by trying them all (FiT's
tables: NTK-aware, YaRN, NTK-pro, ... at 320x320, 224x448, 160x480). ``ExtrapolationSweep``
is that experiment as a test loop: for each rule variant it sets the rule on the model's
RoPE, generates the test requests at the sweep's sizes with :class:`GenerationLoop`'s
machinery (sharded, resumable, one output folder per variant) and scores them with the test
evaluator (FID on a GPU, the demo's judge on a CPU). ``sweep.json`` and ``sweep.md`` in the
sweep folder hold one row per (rule, decouple, size); ``tools/sweep_extrapolation.py`` adds
the image grid.
"""
import copy
import os.path as osp
from typing import List, Optional, Sequence

from mmengine.dist import broadcast_object_list, get_dist_info

from flexgen.evaluation.generation import markdown_table, write_table_files
from flexgen.evaluation.utils import size_key
from flexgen.position_encodings.rope_scaling import REFERENCE_NAMES, build_rope_rule
from flexgen.registry import DATASETS, LOOPS

from .generation_loop import (GenerationLoop, _unwrap, check_sizes, default_out_dir,
                              generation_manifest, weights_digest)

DECOUPLE_MODES = ('both', 'on', 'off')


def sweep_variants(rules: Sequence[str], decouple: str = 'both',
                   ori_max_pe_len: Optional[float] = None) -> List[dict]:
    """``[dict(name, rule)]``: each rule coupled and / or decoupled (``decouple``); plain
    extrapolation, which has no scale to decouple, once."""
    if decouple not in DECOUPLE_MODES:
        raise ValueError(f'decouple must be one of {DECOUPLE_MODES}, got {decouple!r}')
    variants = []
    for rule in rules:
        kind = REFERENCE_NAMES.get(rule, rule)
        choices = [False] if kind == 'Extrapolation' else \
            dict(both=[False, True], on=[True], off=[False])[decouple]
        for flag in choices:
            cfg = dict(type=kind, decouple=flag)
            if ori_max_pe_len is not None and kind != 'Extrapolation':
                cfg['ori_max_pe_len'] = ori_max_pe_len
            variants.append(dict(name=kind + ('-decouple' if flag else ''), rule=cfg))
    names = [v['name'] for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f'sweep: a rule is named twice in {list(rules)}')
    return variants


@LOOPS.register_module()
class ExtrapolationSweep(GenerationLoop):
    """Generates and scores the test requests at ``sizes`` once per RoPE rule variant.

    Args:
        rules: rule types (``NTKAware``, ``YaRN``, ...) or the reference names (``no``,
            ``linear``, ``dynntk``, ``yarn``, ``ntkpro2``, ...).
        sizes: ``(H, W)`` pixel sizes (they replace the test requests' sizes).
        decouple: ``'both'`` (each rule with and without one scale per axis), ``'on'``,
            ``'off'``.
        ori_max_pe_len: the training grid side in patches the rules scale from (default:
            the model's configured rule's, if any).
        out_dir: the sweep folder (default ``work_dir/sweep/<hash of the settings>``), one
            sub-folder per variant.
        The other arguments are :class:`GenerationLoop`'s.

    After ``run``: ``sweep_dir`` and ``variants`` (``dict(name, rule, out_dir)`` each).
    """

    def __init__(self, runner, dataloader, evaluator, rules: Sequence[str],
                 sizes: Sequence[Sequence[int]], decouple: str = 'both',
                 ori_max_pe_len: Optional[float] = None, **kwargs):
        super().__init__(runner, dataloader, evaluator, **kwargs)
        if not rules or not sizes:
            raise ValueError('ExtrapolationSweep: give at least one rule and one size')
        self.sizes = [tuple(int(x) for x in size) for size in sizes]
        self.rules, self.decouple, self.ori_max_pe_len = list(rules), decouple, ori_max_pe_len
        sweep_variants(self.rules, decouple, ori_max_pe_len)  # names are checked now

    def _rope(self):
        rope = getattr(getattr(_unwrap(self.runner.model), 'backbone', None), 'rope', None)
        if rope is None or not hasattr(rope, 'set_rule'):
            raise ValueError('ExtrapolationSweep: the model has no RoPE (model.backbone.rope) '
                             'whose extrapolation rule could be swept')
        return rope

    def run(self) -> dict:
        runner = self.runner
        rope = self._rope()
        length = self.ori_max_pe_len or getattr(rope.rule, 'ori_max_pe_len', None)
        variants = sweep_variants(self.rules, self.decouple, length)
        for variant in variants:  # every rule builds (e.g. has its length) before any image
            build_rope_rule(variant['rule'])
        check_sizes(_unwrap(runner.model), self.sizes)
        requests_cfg = copy.deepcopy(runner.cfg.test_dataloader.dataset)
        requests_cfg['sizes'] = [list(size) for size in self.sizes]
        requests = DATASETS.build(requests_cfg)
        runner.call_hook('before_test')
        runner.call_hook('before_test_epoch')
        runner.model.eval()
        rank, world = get_dist_info()
        weights = weights_digest(runner.model)  # once: the variants share the weights
        holder = [self.out_dir]
        if self.out_dir is None:
            base = generation_manifest(runner.cfg.model, requests_cfg, weights)
            holder = [default_out_dir(osp.join(runner.work_dir, 'sweep'),
                                      dict(base, variants=variants, precision=self.precision,
                                           shard_size=self.shard_size))]
        if world > 1:
            broadcast_object_list(holder)
        sweep_dir = holder[0]
        original = rope.rule
        rows, metrics, folders = [], {}, []
        try:
            for variant in variants:
                rope.set_rule(variant['rule'])
                model_cfg = copy.deepcopy(runner.cfg.model)
                model_cfg['backbone']['rope']['rule'] = variant['rule']
                folder = osp.join(sweep_dir, variant['name'])
                result = self.generate(requests, model_cfg, requests_cfg, folder, weights)
                folders.append(dict(variant, out_dir=folder))
                for row in result['rows']:
                    rows.append(dict(rule=variant['rule']['type'],
                                     decouple=variant['rule']['decouple'], **row))
                metrics.update({f"{variant['name']}/{k}": v
                                for k, v in result['metrics'].items()})
        finally:
            rope.set_rule(original)
        self.sweep_dir, self.variants = sweep_dir, folders
        if rank == 0:
            write_table_files(osp.join(sweep_dir, 'sweep'), rows, metrics, variants=folders,
                              sizes=[size_key(s) for s in self.sizes])
            runner.logger.info(f'Extrapolation sweep ({osp.join(sweep_dir, "sweep.md")}):\n'
                               + markdown_table(rows))
        runner.call_hook('after_test_epoch', metrics=metrics)
        runner.call_hook('after_test')
        return metrics
