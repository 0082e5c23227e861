"""Official reference checkpoints (DiT, SiT, FiT, ...) as ready flexgen generators.

    from flexgen.apis.official import load_official

    model = load_official('configs/dit/dit_xl_2_256.py', 'DiT-XL-2-256x256.pt')
    images = model.generate(labels=[207, 360], sizes=[(256, 256)], seeds=[0, 1])  # [-1, 1]

``load_official`` reads the file (safetensors, or ``torch.load(weights_only=True)``: no
pickled code runs), converts the reference state dict to flexgen's keys with a converter
of the ``CHECKPOINT_CONVERTERS`` registry (``'DiT'``, ``'SiT'``, ...; chosen from the
checkpoint and the config when not named), checks that the config's backbone is the
network the weights describe (sizes and the time / output boundary settings that make
flexgen's outputs equal the reference's), and returns the config's ``DiffusionGenerator``
with those weights, in eval mode. ``tools/sample.py`` and ``tools/test.py`` take this path
by themselves when their checkpoint is a reference state dict;
``tools/convert_checkpoint.py`` writes the converted weights once, as safetensors.
"""
import importlib
import inspect
import pkgutil
from typing import List, Optional, Union

import torch
from mmengine.config import Config

from flexgen.fileio import load_checked, read_checkpoint
from flexgen.models.converters.base import CheckpointConverter
from flexgen.registry import CHECKPOINT_CONVERTERS, MODELS

# Backbone settings that choose how a number is computed, not which number: never checked.
UNCHECKED_SETTINGS = ('attn_backend',)


def import_converters() -> None:
    """Import every module of ``flexgen.models.converters`` (each registers its converters)."""
    import flexgen.models.converters as package
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f'{package.__name__}.{module.name}')


def converter_names() -> List[str]:
    import_converters()
    return sorted(CHECKPOINT_CONVERTERS.module_dict)


def build_converter(converter):
    """A converter from a registered name (any case: ``'dit'`` is ``'DiT'``), a config
    dict (``dict(type='DiT', num_heads=4)``) or a :class:`CheckpointConverter` (returned
    as is)."""
    if converter is None or isinstance(converter, CheckpointConverter):
        return converter
    if not isinstance(converter, (str, dict)):
        raise TypeError(f'converter must be a registered name, a config dict or a '
                        f'CheckpointConverter, got {type(converter).__name__}')
    import_converters()
    cfg = dict(type=converter) if isinstance(converter, str) else dict(converter)
    by_lower = {name.lower(): name for name in CHECKPOINT_CONVERTERS.module_dict}
    if isinstance(cfg.get('type'), str) and cfg['type'].lower() in by_lower:
        cfg['type'] = by_lower[cfg['type'].lower()]
    return CHECKPOINT_CONVERTERS.build(cfg)


def matching_converters(checkpoint: dict) -> list:
    """Every registered converter (default settings) that recognises ``checkpoint``."""
    found = []
    for name in converter_names():
        converter = build_converter(name)
        if converter.matches(checkpoint):
            found.append(converter)
    return found


def is_official_checkpoint(checkpoint: Union[str, dict]) -> bool:
    """Whether a file (read lazily) or loaded dict is a reference checkpoint that some
    registered converter recognises (a flexgen checkpoint is not)."""
    if isinstance(checkpoint, str):
        checkpoint = read_checkpoint(checkpoint, lazy=True)
    return bool(matching_converters(checkpoint))


# ----------------------------------------------------------------------- checking
def _default_settings(backbone_cfg: dict) -> dict:
    cls = MODELS.get(backbone_cfg.get('type', 'FlexDiT'))
    return {name: p.default for name, p in inspect.signature(cls).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _same(expected, actual) -> bool:
    if isinstance(expected, dict):  # the converter's keys must agree; more keys may be set
        return isinstance(actual, dict) and all(_same(v, actual.get(k))
                                                for k, v in expected.items())
    if isinstance(expected, (int, float)) and not isinstance(expected, bool) and \
            isinstance(actual, (int, float)) and not isinstance(actual, bool):
        return float(expected) == float(actual)
    if isinstance(expected, (list, tuple)) and isinstance(actual, (list, tuple)):
        return len(expected) == len(actual) and all(map(_same, expected, actual))
    return expected == actual


def backbone_mismatches(backbone_cfg: dict, settings: dict) -> List[str]:
    """Where the config's backbone differs from the settings a converter derived from the
    weights (a setting the config leaves out counts with the backbone's default)."""
    defaults = _default_settings(backbone_cfg)
    problems = []
    for key, expected in settings.items():
        if key in UNCHECKED_SETTINGS:
            continue
        actual = backbone_cfg[key] if key in backbone_cfg else defaults.get(key, '<unset>')
        if not _same(expected, actual):
            problems.append(f'model.backbone.{key} is {actual!r}, the checkpoint needs '
                            f'{expected!r}')
    return problems


def convert_for_config(cfg: Config, checkpoint: Union[str, dict], converter=None,
                       use_ema: bool = True):
    """Convert a reference checkpoint for the config's model, checking that they fit.

    Args:
        cfg: a flexgen config whose ``model.backbone`` should describe the network.
        checkpoint: a file path or an already loaded checkpoint dict.
        converter: registered name / config dict / object; ``None`` tries every registered
            converter that recognises the checkpoint and keeps the one whose settings the
            config agrees with (DiT and SiT files have the same keys: the config's time
            settings tell them apart).
        use_ema: take the EMA weights of a training checkpoint (released files are EMA).

    Returns:
        a ``ConvertedCheckpoint`` (``state_dict`` for ``generator.backbone``).

    Raises:
        ValueError: no converter recognises the file, or the config's backbone differs from
            what the weights need (every difference is named).
    """
    source = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint)
    where = checkpoint if isinstance(checkpoint, str) else 'the checkpoint'
    backbone_cfg = dict(cfg.model.backbone)
    if converter is not None:
        converter = build_converter(converter)
        converted = converter(source, use_ema=use_ema)
        problems = backbone_mismatches(backbone_cfg, converted.backbone)
        if problems:
            raise ValueError(f'{where} ({type(converter).__name__}) does not fit the config: '
                             + '; '.join(problems))
        return converted
    candidates = matching_converters(source)
    if not candidates:
        raise ValueError(f'{where} is not a reference checkpoint any registered converter '
                         f'recognises ({", ".join(converter_names())})')
    results, reports = [], []
    for candidate in candidates:
        converted = candidate(source, use_ema=use_ema)
        problems = backbone_mismatches(backbone_cfg, converted.backbone)
        (results.append(converted) if not problems else
         reports.append(f'{type(candidate).__name__}: ' + '; '.join(problems)))
    if len(results) == 1:
        return results[0]
    if not results:
        raise ValueError(f'{where} does not fit the config with any converter that '
                         f'recognises it: {" | ".join(reports)}')
    raise ValueError(f'{where}: several converters fit the config; name one (converter=...)')


def load_official(config, checkpoint: Union[str, dict], converter=None,
                  device: Union[str, torch.device] = 'cpu', use_ema: bool = True,
                  cfg_options: Optional[dict] = None):
    """A ready ``DiffusionGenerator`` (eval mode, on ``device``) from a flexgen config and
    an official reference checkpoint (a ``.pt`` / ``.pth`` / ``.safetensors`` path or a
    loaded dict). See :func:`convert_for_config` for ``converter`` and ``use_ema``;
    ``cfg_options`` overrides config entries first (as ``--cfg-options`` does)."""
    import flexgen
    flexgen.register_all_modules()
    cfg = Config.fromfile(config) if isinstance(config, str) else config
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    converted = convert_for_config(cfg, checkpoint, converter, use_ema)
    model = MODELS.build(cfg.model)
    load_checked(model.backbone, converted.state_dict, f'checkpoint {checkpoint}'
                 if isinstance(checkpoint, str) else 'the converted checkpoint')
    model.official_info = dict(converted.info)
    return model.to(device).eval()
