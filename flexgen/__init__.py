"""flexgen: diffusion transformers at any resolution and aspect ratio.

The top-level import stays light: building blocks register themselves when a registry
first needs them (lazy `locations` in `flexgen.registry`), or all at once through
:func:`register_all_modules`.
"""
from .version import __version__


def register_all_modules(init_default_scope: bool = True) -> None:
    """Import every flexgen package that registers modules (the union of the registries'
    ``locations`` in :mod:`flexgen.registry`) and optionally make 'flexgen' the default
    registry scope, as tools, APIs and tests need."""
    import flexgen.datasets  # noqa: F401
    import flexgen.engine  # noqa: F401
    import flexgen.evaluation  # noqa: F401
    import flexgen.losses  # noqa: F401
    import flexgen.models  # noqa: F401
    import flexgen.models.converters  # noqa: F401
    import flexgen.position_encodings  # noqa: F401
    import flexgen.samplers  # noqa: F401
    import flexgen.transports  # noqa: F401
    if init_default_scope:
        from mmengine.registry import DefaultScope
        if DefaultScope.get_current_instance() is None or \
                DefaultScope.get_current_instance().scope_name != 'flexgen':
            DefaultScope.get_instance(f'flexgen-{id(object())}', scope_name='flexgen')


__all__ = ['__version__', 'register_all_modules']
