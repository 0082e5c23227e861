"""The diffusion transformer backbone behind every reference configuration."""
import torch.nn as nn

from flexgen.registry import MODELS, POSITION_ENCODINGS
from ..blocks import build_block


@MODELS.register_module()
class FlexDiT(nn.Module):
    """A DiT (Peebles & Xie 2023) on jagged token batches of any image sizes.

    ``forward(batch, t, y)`` maps the tokens of a :class:`~flexgen.structures.TokenBatch`
    (patches in ``(c, p1, p2)`` order) with per-image model times ``t`` ``[B]`` and labels
    ``y`` ``[B]`` (``num_classes`` = no class) to ``p*p*out_channels`` values per token.
    Configurations choose the block (``block``, see :mod:`flexgen.models.blocks.base` for
    what a block receives and provides), the absolute position embedding (``pos_embed``,
    e.g. ``SinCos2D``; DiT / SiT) and/or the rotary one (``rope``, e.g. ``AxialRoPE2D``;
    FiT / NiT). The other parts are registered modules too, each built from its config
    with the sizes the backbone knows:

    - ``patch_embed`` (``PatchEmbed``): ``in_channels``, ``patch_size``, ``hidden_size``;
      ``forward(tokens) -> [N, D]``; module ``x_embedder``.
    - ``t_embedder`` (``TimestepEmbedder``): ``hidden_size``; ``forward(model_t) -> [B, D]``.
    - ``y_embedder`` (``LabelEmbedder``): ``num_classes``, ``hidden_size``;
      ``forward(labels) -> [B, D]``, label ``num_classes`` is "no class".
    - ``final_layer`` (``FinalLayer``): ``hidden_size``, ``out_features``;
      ``forward(x, c, batch) -> [N, out_features]``.

    Initialisation (DiT's): every ``nn.Linear`` gets xavier-uniform weights and zero
    biases, then each part's own ``init_weights()`` runs, where it has one.

    Args:
        time_scale: the model time fed to the timestep sinusoid is ``time_scale * t`` for
            flexgen's ``t`` in [0, 1]. 1000 spreads [0, 1] over the sinusoid's frequencies
            as DiT's integer steps do; checkpoints trained otherwise set what they used.
        time_flip: feed ``time_scale * (1 - t)``: for checkpoints trained with t = 0 noise
            (SiT, FiTv2), adapted here so the rest of flexgen keeps one convention.
        output_scale: multiplies the output (-1 turns SiT's velocity, d/d(1 - t), into
            flexgen's d/dt).
        global_modulation: e.g. ``dict(type='AdaLNZero')``: FiTv2's global adaLN, one
            ``SiLU -> Linear(D, 6D)`` computed once per image and added to every block's
            own modulation (``global_adaLN_modulation``; zero-initialised).
        time_max: clamp the model time to at most this value. Only to reproduce the
            FiTv1 reference forward, which embeds ``min(t, 1)`` of its integer DDPM step
            (so every step >= 1 looks alike); set by the FiTv1 converter's
            ``clamp_time`` option for parity checks, never for training or sampling.
        trainable: name substrings; when given, only parameters whose name contains one
            of them train and every other parameter is frozen (``requires_grad=False``,
            so it gets no gradient and counts in no gradient-clipping norm). FiTv2's
            high-resolution fine-tuning trains ``('x_embedder', 'bias', 'LN',
            'final_layer')`` ('LN' matches every ``adaLN_modulation``).
        compile_blocks: regional compilation: ``True`` (or a dict of ``torch.compile``
            options) compiles each block with dynamic token counts; the blocks share one
            compiled graph, and the attention kernel call stays outside it (its segment
            plan changes with every pack), so packs of any lengths reuse the compilation.
        mlp, qk_norm, modulation, attn_backend: options shared by every block, each
            passed to blocks whose constructor takes it (``mlp_ratio`` goes into ``mlp``).
        patch_embed, t_embedder, y_embedder, final_layer: the parts' configs (see above).
    """

    def __init__(self, in_channels, patch_size, hidden_size, depth, num_heads, num_classes,
                 out_channels=None, learn_sigma=False, mlp_ratio=4.0,
                 block=dict(type='AdaLNZeroBlock'), mlp=dict(type='GeluMlp'), qk_norm=None,
                 modulation=dict(type='AdaLNZero'), attn_backend='sdpa',
                 pos_embed=dict(type='SinCos2D'), rope=None, time_scale=1000.0,
                 time_flip=False, output_scale=1.0, global_modulation=None, time_max=None,
                 trainable=None, compile_blocks=False, patch_embed=dict(type='PatchEmbed'),
                 t_embedder=dict(type='TimestepEmbedder'),
                 y_embedder=dict(type='LabelEmbedder'), final_layer=dict(type='FinalLayer')):
        super().__init__()
        self.in_channels, self.patch_size = in_channels, patch_size
        self.out_channels = (out_channels or in_channels) * (2 if learn_sigma else 1)
        self.learn_sigma, self.num_classes = learn_sigma, num_classes
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.time_scale, self.time_flip, self.output_scale = time_scale, time_flip, output_scale
        self.time_max = time_max

        self.x_embedder = MODELS.build(dict(patch_embed, in_channels=in_channels,
                                            patch_size=patch_size, hidden_size=hidden_size))
        self.t_embedder = MODELS.build(dict(t_embedder, hidden_size=hidden_size))
        self.y_embedder = MODELS.build(dict(y_embedder, num_classes=num_classes,
                                            hidden_size=hidden_size))
        self.pos_embed = (POSITION_ENCODINGS.build(dict(pos_embed, dim=hidden_size))
                          if pos_embed else None)
        self.rope = (POSITION_ENCODINGS.build(dict(rope, head_dim=hidden_size // num_heads))
                     if rope else None)
        mlp = dict(mlp, mlp_ratio=mlp_ratio) if 'mlp_ratio' not in mlp else mlp
        self.blocks = nn.ModuleList(
            build_block(block, hidden_size, num_heads, mlp=mlp, qk_norm=qk_norm,
                        modulation=modulation, attn_backend=attn_backend)
            for _ in range(depth))
        self.global_adaLN_modulation = None
        if global_modulation:
            chunks = {getattr(b, 'modulation_chunks', None) for b in self.blocks}
            if len(chunks) != 1 or None in chunks:
                raise ValueError(f'FlexDiT: global_modulation needs blocks that declare '
                                 f'modulation_chunks (flexgen.models.blocks.base); '
                                 f'{type(self.blocks[0]).__name__} declares {chunks}')
            self.global_adaLN_modulation = MODELS.build(
                dict(global_modulation, hidden_size=hidden_size, num_chunks=chunks.pop()))
        self.final_layer = MODELS.build(dict(final_layer, hidden_size=hidden_size,
                                             out_features=patch_size ** 2 * self.out_channels))
        self.initialize_weights()
        if trainable is not None:
            self.freeze_all_but(trainable)
        if compile_blocks:
            options = dict(dynamic=True, **(compile_blocks if isinstance(compile_blocks, dict)
                                            else {}))
            for block in self.blocks:  # one compiled graph shared by every block
                block.compile(**options)

    def initialize_weights(self):
        """DiT's initialisation: xavier-uniform weights and zero biases for every
        ``nn.Linear``, then each part's ``init_weights()`` (N(0, 0.02) embeddings, zero
        adaLN and output layers: every block starts as the identity, the output at zero).

        The parts run in DiT's order of random draws (label table, then timestep MLP).
        Named apart from mmengine's ``init_weights``, which the Runner calls on a model's
        children at the start of training and which would draw the weights a second time.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        parts = (self.x_embedder, self.pos_embed, self.rope, self.y_embedder, self.t_embedder,
                 *self.blocks, self.global_adaLN_modulation, self.final_layer)
        for part in parts:
            if part is not None and hasattr(part, 'init_weights'):
                part.init_weights()

    def freeze_all_but(self, trainable):
        """Freeze every parameter whose name contains none of the substrings ``trainable``."""
        if isinstance(trainable, str):
            trainable = (trainable,)
        names = [name for name, _ in self.named_parameters()]
        for pattern in trainable:
            if not any(pattern in name for name in names):
                raise ValueError(f'FlexDiT: trainable pattern {pattern!r} matches no parameter '
                                 f'(names look like {names[:3]})')
        for name, param in self.named_parameters():
            param.requires_grad_(any(pattern in name for pattern in trainable))

    def condition(self, t, y):
        """Per-image conditioning ``c = t_emb + y_emb`` ``[B, D]``."""
        # float64: the samplers' t = k / T must come back as exactly k (float32 misses by 1 ulp)
        t = t.double()
        model_t = (self.time_scale * (1 - t if self.time_flip else t)).float()
        if self.time_max is not None:
            model_t = model_t.clamp(max=self.time_max)
        return self.t_embedder(model_t) + self.y_embedder(y)

    def forward(self, batch, t, y, feature_block=None):
        """Output tokens; with ``feature_block=k`` also the hidden tokens after block ``k``
        (1-based, REPA's alignment features): ``(output, features)``."""
        x = self.x_embedder(batch.tokens)
        if self.pos_embed is not None:
            x = x + self.pos_embed(batch.positions).to(x.dtype)
        rope = self.rope(batch) if self.rope is not None else None
        c = self.condition(t, y)
        # The block contract (flexgen.models.blocks.base): positional arguments, the
        # global modulation only when there is one.
        extra = (() if self.global_adaLN_modulation is None else
                 (self.global_adaLN_modulation(c),))
        features = None
        for index, block in enumerate(self.blocks, start=1):
            x = block(x, c, batch, rope, *extra)
            if index == feature_block:
                features = x
        out = self.final_layer(x, c, batch)
        if self.output_scale != 1.0:
            out = out * self.output_scale
        return out if feature_block is None else (out, features)
