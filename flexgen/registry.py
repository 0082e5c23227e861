"""Every registry of flexgen, in one place.

flexgen declares a child of every mmengine root registry (so `default_scope='flexgen'`
finds flexgen's modules first and mmengine's second, with no scope warnings), plus
registries of its own for the building blocks of diffusion transformers:

==========================  ==========================================================
registry                    what registers there
==========================  ==========================================================
MODELS                      generators, backbones, blocks, MLPs, modulation, autoencoders,
                            losses
POSITION_ENCODINGS          absolute sin-cos, 2D axial RoPE (and its extrapolation rules)
ATTENTION_BACKENDS          how block-diagonal attention over a jagged batch is computed
TRANSPORTS                  noise processes: rectified flow, DDPM, interpolants
TIME_SAMPLERS               training-time distributions of t
SAMPLERS                    generation: ODE / SDE / ancestral samplers
GUIDANCE                    guidance wrappers (classifier-free, interval, autoguidance)
CHECKPOINT_CONVERTERS       official checkpoints (DiT, SiT, FiT, FiTv2, NiT) -> flexgen keys
DATASETS, DATA_SAMPLERS     datasets; bucket / token-budget (packing) batch samplers
HOOKS, LOOPS, METRICS, ...  the Runner's parts, as in mmengine
==========================  ==========================================================

Every registry imports its package lazily (`locations`), so `dict(type='Name')` works in
a config without importing anything by hand. A `type` that is not registered raises a
`KeyError` naming the registry and the closest registered names.
"""
import difflib
import inspect

from mmengine.registry import DATA_SAMPLERS as MMENGINE_DATA_SAMPLERS
from mmengine.registry import DATASETS as MMENGINE_DATASETS
from mmengine.registry import EVALUATOR as MMENGINE_EVALUATOR
from mmengine.registry import FUNCTIONS as MMENGINE_FUNCTIONS
from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import INFERENCERS as MMENGINE_INFERENCERS
from mmengine.registry import LOG_PROCESSORS as MMENGINE_LOG_PROCESSORS
from mmengine.registry import LOOPS as MMENGINE_LOOPS
from mmengine.registry import METRICS as MMENGINE_METRICS
from mmengine.registry import MODEL_WRAPPERS as MMENGINE_MODEL_WRAPPERS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import \
    OPTIM_WRAPPER_CONSTRUCTORS as MMENGINE_OPTIM_WRAPPER_CONSTRUCTORS
from mmengine.registry import OPTIM_WRAPPERS as MMENGINE_OPTIM_WRAPPERS
from mmengine.registry import OPTIMIZERS as MMENGINE_OPTIMIZERS
from mmengine.registry import PARAM_SCHEDULERS as MMENGINE_PARAM_SCHEDULERS
from mmengine.registry import Registry
from mmengine.registry import \
    RUNNER_CONSTRUCTORS as MMENGINE_RUNNER_CONSTRUCTORS
from mmengine.registry import RUNNERS as MMENGINE_RUNNERS
from mmengine.registry import STRATEGIES as MMENGINE_STRATEGIES
from mmengine.registry import TASK_UTILS as MMENGINE_TASK_UTILS
from mmengine.registry import TRANSFORMS as MMENGINE_TRANSFORMS
from mmengine.registry import VISBACKENDS as MMENGINE_VISBACKENDS
from mmengine.registry import VISUALIZERS as MMENGINE_VISUALIZERS
from mmengine.registry import \
    WEIGHT_INITIALIZERS as MMENGINE_WEIGHT_INITIALIZERS
from mmengine.registry import build_from_cfg
from mmengine.utils import ManagerMixin

SCOPE = 'flexgen'


class FlexRegistry(Registry):
    """An mmengine `Registry` whose failed look-ups say what was meant.

    mmengine answers an unknown `type` with a bare "X is not in the registry"; a
    flexgen registry names itself, its scope and the closest registered names, and a
    config whose keys do not fit its class's constructor is reported for that class (not
    for the config it is nested in) with the arguments the class takes.
    """

    def _all_names(self):
        names = set(self._module_dict)
        parent = self.parent
        while parent is not None:
            names.update(parent._module_dict)
            parent = parent.parent
        return names

    def get(self, key):
        obj = super().get(key)
        if obj is None and isinstance(key, str):
            raise KeyError(self.unknown_message(key))
        return obj

    def __contains__(self, key):
        return super().get(key) is not None

    def unknown_message(self, key):
        _, real_key = self.split_scope_key(key)
        names = self._all_names()
        close = difflib.get_close_matches(real_key, sorted(names), n=3, cutoff=0.5)
        hint = (f' Closest registered names: {", ".join(repr(c) for c in close)}.'
                if close else f' Registered names: {", ".join(sorted(names)[:20])}.')
        return (f"'{key}' is not registered in the '{self.name}' registry of scope "
                f"'{self.scope}' (nor in its parents).{hint} A module of your own must "
                'be imported first, e.g. with custom_imports in the config.')


def _signature_problem(obj_cls, args, registry):
    """Why ``obj_cls(**args)`` does not fit its signature (unknown or missing arguments),
    or None. Checked before the call, so that a mismatch inside the constructor (a nested
    build, a bug) is never blamed on this config."""
    if not callable(obj_cls) or (inspect.isclass(obj_cls) and issubclass(obj_cls, ManagerMixin)):
        return None  # ManagerMixin classes are built through get_instance(name, ...)
    try:
        params = inspect.signature(obj_cls).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return None
    named = [name for name, p in params.items()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    unknown = [] if takes_any else [key for key in args if key not in named]
    missing = [name for name in named if params[name].default is inspect.Parameter.empty
               and name not in args]
    if not unknown and not missing:
        return None
    name = getattr(obj_cls, '__name__', repr(obj_cls))
    sentences = []
    for key in unknown:
        close = difflib.get_close_matches(key, named, n=1, cutoff=0.5)
        sentences.append(f'unexpected argument {key!r}.' +
                         (f" Did you mean '{close[0]}'?" if close else ''))
    if missing:
        sentences.append(f'missing argument{"s" if len(missing) > 1 else ""} '
                         f'{", ".join(repr(m) for m in missing)}.')
    return (f'`{name}` ({registry.name} registry): {" ".join(sentences)} `{name}` accepts: '
            f'{", ".join(named) or "no arguments"}{" (and any keyword)" if takes_any else ""}.')


def _build_with_hints(cfg, registry, default_args=None):
    """`build_from_cfg` that first checks the config's keys against the constructor of the
    class it names and reports a mismatch at this level only: the class, its registry,
    the closest accepted names and every accepted argument. Errors raised while the
    class builds itself (its own nested configs included) propagate unchanged."""
    if isinstance(cfg, dict) and isinstance(registry, Registry):
        args = dict(cfg)
        for key, value in (default_args or {}).items():
            args.setdefault(key, value)
        obj_type = args.pop('type', None)
        scope = args.pop('_scope_', None)
        if obj_type is not None:
            with registry.switch_scope_and_registry(scope) as scoped:
                obj_cls = scoped.get(obj_type) if isinstance(obj_type, str) else obj_type
            problem = _signature_problem(obj_cls, args, scoped)
            if problem:
                raise TypeError(problem)
    return build_from_cfg(cfg, registry, default_args)


def _build_model_with_hints(cfg, registry, default_args=None):
    if isinstance(cfg, list):
        import torch.nn as nn
        return nn.Sequential(*[_build_with_hints(c, registry, default_args) for c in cfg])
    return _build_with_hints(cfg, registry, default_args)


def _child(name, parent, locations, build_func=_build_with_hints):
    return FlexRegistry(name, parent=parent, scope=SCOPE, locations=locations,
                        build_func=build_func)


# ----------------------------------------------------------------- runners and loops
RUNNERS = _child('runner', MMENGINE_RUNNERS, ['flexgen.engine'], None)
RUNNER_CONSTRUCTORS = _child('runner constructor', MMENGINE_RUNNER_CONSTRUCTORS,
                             ['flexgen.engine'])
LOOPS = _child('loop', MMENGINE_LOOPS, ['flexgen.engine'])
HOOKS = _child('hook', MMENGINE_HOOKS, ['flexgen.engine'])
STRATEGIES = _child('strategy', MMENGINE_STRATEGIES, ['flexgen.engine'])

# ----------------------------------------------------------------- data
DATASETS = _child('dataset', MMENGINE_DATASETS, ['flexgen.datasets'])
DATA_SAMPLERS = _child('data sampler', MMENGINE_DATA_SAMPLERS, ['flexgen.datasets'])
TRANSFORMS = _child('transform', MMENGINE_TRANSFORMS, ['flexgen.datasets'])

# ----------------------------------------------------------------- models
MODELS = _child('model', MMENGINE_MODELS, ['flexgen.models', 'flexgen.losses'],
                _build_model_with_hints)
MODEL_WRAPPERS = _child('model_wrapper', MMENGINE_MODEL_WRAPPERS, ['flexgen.engine'])
WEIGHT_INITIALIZERS = _child('weight initializer', MMENGINE_WEIGHT_INITIALIZERS,
                             ['flexgen.models'])
TASK_UTILS = _child('task util', MMENGINE_TASK_UTILS, ['flexgen.models'])

# ----------------------------------------------------------------- optimisation
OPTIMIZERS = _child('optimizer', MMENGINE_OPTIMIZERS, ['flexgen.engine'], None)
OPTIM_WRAPPERS = _child('optim_wrapper', MMENGINE_OPTIM_WRAPPERS, ['flexgen.engine'])
OPTIM_WRAPPER_CONSTRUCTORS = _child('optimizer wrapper constructor',
                                    MMENGINE_OPTIM_WRAPPER_CONSTRUCTORS, ['flexgen.engine'])
PARAM_SCHEDULERS = _child('parameter scheduler', MMENGINE_PARAM_SCHEDULERS,
                          ['flexgen.engine'], None)

# ----------------------------------------------------------------- evaluation and logging
METRICS = _child('metric', MMENGINE_METRICS, ['flexgen.evaluation'])
EVALUATOR = _child('evaluator', MMENGINE_EVALUATOR, ['flexgen.evaluation'])
VISUALIZERS = _child('visualizer', MMENGINE_VISUALIZERS, ['flexgen.engine'])
VISBACKENDS = _child('vis_backend', MMENGINE_VISBACKENDS, ['flexgen.engine'])
LOG_PROCESSORS = _child('log_processor', MMENGINE_LOG_PROCESSORS, ['flexgen.engine'])
INFERENCERS = _child('inferencer', MMENGINE_INFERENCERS, [])
FUNCTIONS = _child('function', MMENGINE_FUNCTIONS, ['flexgen.datasets'])

# ----------------------------------------------------------------- flexgen's own
POSITION_ENCODINGS = FlexRegistry('position encoding', scope=SCOPE,
                                  locations=['flexgen.position_encodings'],
                                  build_func=_build_with_hints)
ATTENTION_BACKENDS = FlexRegistry('attention backend', scope=SCOPE,
                                  locations=['flexgen.models.layers'],
                                  build_func=_build_with_hints)
TRANSPORTS = FlexRegistry('transport', scope=SCOPE, locations=['flexgen.transports'],
                          build_func=_build_with_hints)
TIME_SAMPLERS = FlexRegistry('time sampler', scope=SCOPE, locations=['flexgen.transports'],
                             build_func=_build_with_hints)
SAMPLERS = FlexRegistry('sampler', scope=SCOPE, locations=['flexgen.samplers'],
                        build_func=_build_with_hints)
GUIDANCE = FlexRegistry('guidance', scope=SCOPE, locations=['flexgen.samplers'],
                        build_func=_build_with_hints)
CHECKPOINT_CONVERTERS = FlexRegistry('checkpoint converter', scope=SCOPE,
                                     locations=['flexgen.models.converters'],
                                     build_func=_build_with_hints)


def build(registry, cfg, **default_args):
    """Build `cfg` (a dict, or an object passed through unchanged) from `registry`."""
    if cfg is None or not isinstance(cfg, dict):
        return cfg
    return registry.build(cfg, default_args=default_args or None)


def build_part(registry, cfg, base, owner, role, provides=''):
    """`build` a part that must follow the contract `base`: a TypeError naming `owner`,
    the `role` it plays, the base class's module and what it `provides` otherwise (None
    passes through)."""
    part = build(registry, cfg)
    if part is not None and not isinstance(part, base):
        provides = f': {provides}' if provides else ''
        raise TypeError(f'{owner}: {role} must be a {base.__name__} (the contract in '
                        f'{base.__module__}{provides}), got {type(part).__name__}')
    return part
