"""Registration is explicit: every registered module lives where its registry looks for it,
`register_all_modules` finds every one of them, and the lower layers never import the API.

Each check runs in a fresh interpreter, so no module imported by another test (or by a
module that happens to import another package) can make a registration look reachable."""
import ast
import inspect
import json
import os
import os.path as osp
import subprocess
import sys

import pytest

from helpers import ROOT

LOWER_LAYERS = ('models', 'samplers', 'transports', 'engine', 'datasets', 'losses',
                'position_encodings')

# Prints {registry attribute: {name: (module of the registered object, locations)}} after
# `setup` ran in a fresh interpreter.
REGISTRIES = '''
import json, sys
import mmengine.registry
import flexgen.registry as R
SETUP
out = {}
for attr, registry in vars(R).items():
    if isinstance(registry, mmengine.registry.Registry) and registry.scope == R.SCOPE:
        out[attr] = {name: [getattr(obj, '__module__', ''), list(registry._locations)]
                     for name, obj in registry.module_dict.items()}
print(json.dumps(out))
'''

IMPORT_EVERY_MODULE = '''
import importlib, pkgutil
import flexgen
for info in pkgutil.walk_packages(flexgen.__path__, 'flexgen.'):
    importlib.import_module(info.name)
'''


def fresh(code):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get('PYTHONPATH', '')]))
    proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def registered(setup):
    return json.loads(fresh(REGISTRIES.replace('SETUP', setup)).splitlines()[-1])


@pytest.fixture(scope='module')
def every_module():
    """The registries after importing every module of the package."""
    return registered(IMPORT_EVERY_MODULE)


def test_register_all_modules_registers_everything(every_module):
    after_register_all = registered('import flexgen; flexgen.register_all_modules(False)')
    assert {attr: sorted(names) for attr, names in after_register_all.items()} == \
        {attr: sorted(names) for attr, names in every_module.items()}
    assert 'DirectionLoss' in every_module['MODELS']
    assert 'FullyShardedWrapper' in every_module['MODEL_WRAPPERS']


def test_every_module_lives_where_its_registry_looks(every_module):
    """A registry's lazy ``locations`` import the module of each of its entries, so a config
    builds any registered ``type`` with nothing imported by hand."""
    misplaced = [f'{attr}: {name} is in {module}, the registry looks in {locations}'
                 for attr, names in every_module.items()
                 for name, (module, locations) in names.items()
                 if not any(module == loc or module.startswith(loc + '.') for loc in locations)]
    assert not misplaced
    lazily = registered('for registry in vars(R).values():\n'
                        '    if isinstance(registry, mmengine.registry.Registry) and '
                        'registry.scope == R.SCOPE:\n'
                        '        registry.import_from_location()')
    assert lazily == every_module


def test_registered_names_build_or_say_what_they_need():
    """After register_all_modules every name resolves, and every one whose constructor
    needs no argument builds or refuses naming itself and the missing piece (an optional
    GPU kernel's package, a setting without a default such as a RoPE rule's training
    length)."""
    import flexgen
    from flexgen import registry as R
    flexgen.register_all_modules()
    built, refused = [], []
    for attr, registry in vars(R).items():
        if not isinstance(registry, R.FlexRegistry) or attr in ('RUNNERS', 'OPTIM_WRAPPERS'):
            continue  # the Runner and its optimiser wrappers are built by the Runner
        for name, obj in registry.module_dict.items():
            if not obj.__module__.startswith('flexgen.'):
                continue  # registered by a test
            assert registry.get(name) is obj
            params = inspect.signature(obj).parameters.values()
            if any(p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                   for p in params):
                continue
            try:
                instance = registry.build(dict(type=name))
            except ImportError as error:
                assert name in str(error) and 'pip install' in str(error), (attr, name, error)
                refused.append(name)
                continue
            except ValueError as error:
                assert str(error).startswith(f'{obj.__name__}: ') and 'required' in str(error)
                refused.append(name)
                continue
            assert isinstance(instance, obj) if inspect.isclass(obj) else instance is not None
            built.append(name)
    assert {'RectifiedFlow', 'EulerODE', 'sdpa', 'auto', 'DirectionLoss', 'NiT',
            'FlexEMAHook', 'ProceduralShapes'} <= set(built)
    assert len(built) > 2 * len(refused)


def test_lower_layers_never_import_the_api():
    """models, samplers, transports, engine, datasets, losses and position encodings may
    be imported without flexgen.apis: neither directly nor through one another."""
    direct = []
    for package in LOWER_LAYERS:
        for folder, _, files in os.walk(osp.join(ROOT, 'flexgen', package)):
            for file in (f for f in files if f.endswith('.py')):
                path = osp.join(folder, file)
                for node in ast.walk(ast.parse(open(path).read())):
                    names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                             [node.module or ''] if isinstance(node, ast.ImportFrom) else [])
                    relative = isinstance(node, ast.ImportFrom) and node.level > 0 and \
                        'apis' in (node.module or '').split('.')
                    if relative or any(n == 'flexgen.apis' or n.startswith('flexgen.apis.')
                                       for n in names):
                        direct.append(osp.relpath(path, ROOT))
    assert not direct
    imported = fresh('import importlib, pkgutil, sys\n'
                     'import flexgen\n'
                     f'for package in {LOWER_LAYERS!r}:\n'
                     '    module = importlib.import_module("flexgen." + package)\n'
                     '    for info in pkgutil.walk_packages(module.__path__, module.__name__ + "."):\n'
                     '        importlib.import_module(info.name)\n'
                     'print(sorted(m for m in sys.modules if m.startswith("flexgen.apis")))')
    assert imported.split('\n')[-2] == '[]'
