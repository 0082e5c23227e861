from setuptools import find_packages, setup


def read_version():
    scope = {}
    with open('flexgen/version.py') as f:
        exec(f.read(), scope)
    return scope['__version__']


setup(
    name='flexgen',
    version=read_version(),
    description='Diffusion transformers at any resolution and aspect ratio: '
    'DiT, SiT, FiT, FiTv2 and NiT as configurations of one set of blocks.',
    packages=find_packages(include=['flexgen', 'flexgen.*']),
    python_requires='>=3.10',
    install_requires=[
        # torch and torchvision move together: timm imports torchvision, and an
        # unpinned torchvision drags torch to whatever build it was made for.
        'torch==2.14.1',
        'torchvision==0.29.1',
        'mmengine==0.10.7',
        # mmengine 0.10.7 still imports pkg_resources in places (removed in 82).
        'setuptools<82',
        'timm>=1.0',
        'diffusers>=0.30',
        'safetensors',
        'einops',
        'numpy',
        'addict',
        'pillow',
        'tqdm',
    ],
    extras_require={
        'gpu': ['flash-attn', 'xformers'],
        # Inception metrics (FID / sFID / IS / precision-recall, flexgen.evaluation.fid):
        # imported when such a metric is built, with an error saying to install this.
        'eval': ['torch-fidelity>=0.4'],
        # scipy: the tests check FID against scipy.linalg.sqrtm.
        'dev': ['pytest', 'tensorboard', 'torchdiffeq', 'torch-fidelity>=0.4', 'scipy'],
    },
)
