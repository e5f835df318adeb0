"""Drives a Hugging Face decoder-only causal LM layer by layer.

This is the only module that knows transformers internals (attribute names, the decoder-layer
calling convention, rotary modules, per-layer attention types, embedding and logit scalings).
Nothing here reads a version string: what differs between transformers releases and families is
read off the model itself.

- Parts: the embedding (``embed_tokens``, ``word_embeddings``, ``wte``, ``embed_in``), the layer
  list (``layers``, ``h``), the final norm (``norm``, ``final_layernorm``, ``ln_f``, ...), the
  rotary module(s) and the output embedding (``get_output_embeddings()``).
- The calling convention (``LayerConvention``), from the decoder layer's ``forward`` signature: the
  cache keyword (``cache=`` from transformers 5.24, ``past_key_values=`` before, ``layer_past=`` in
  Falcon/GPT-NeoX), whether it takes ``cache_position``, and how rotary embeddings are passed
  (``position_embeddings``, or Gemma 3's ``position_embeddings_global/_local`` of 4.x).
- Scalings: Granite's ``embedding_multiplier`` / ``logits_scaling``, Cohere's ``logit_scale``,
  Gemma's final logit softcapping, and an embedding scale the base model applies in its forward
  (Gemma 1/2 before transformers 5 multiply by sqrt(hidden_size) there), measured by the
  self-check.

Lossless-ness does not rest on this file knowing every quirk of a family: ``self_check`` (run once
per model and setup) prefills through the cache in three chunks, compares every position's logits
with the model's own forward, asserts every layer wrote its K/V through the cache, and checks the
DP's candidate layout against single-token calls; anything that differs or fails refuses the
model with ``UnsupportedModelError`` up front, never a crash or a wrong token inside the loop.

Attention implementations: ``eager`` and ``sdpa`` get explicit 4-D masks. The flash-attention family
(``flash_attention_2/3/4`` and hub flash kernels: whatever transformers' own
``is_flash_attention_requested`` calls flash) takes no mask at all: it is causal, aligned to the
bottom right when there are fewer queries than keys, and applies the layer's sliding window itself.
That is exactly the draft and verify layout, because the cache hands attention the K/V view
``[0, start + T)`` for queries at positions ``start .. start + T - 1`` (the view ends at the last
query). The DP's candidate layout needs a custom mask that flash-attn cannot express, so that one
call runs through sdpa (``ModelAdapter.masked_attention``).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from clasp_ext.decoding import attention
from clasp_ext.decoding.kv_cache import ClaspKVCache

SUPPORTED_ATTN = ("eager", "sdpa")  # plus the flash-attention family, see _is_flash_attention

# Names a part goes by across families (first match wins).
BASE_NAMES = ("model", "transformer", "gpt_neox", "language_model")
EMBED_NAMES = ("embed_tokens", "word_embeddings", "wte", "embed_in")
LAYERS_NAMES = ("layers", "h")
NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_layer_norm", "norm_f")
ATTN_NAMES = ("self_attn", "self_attention", "attention", "attn")
# a layer's MLP block (dense or mixture of experts): what skip_unit="mlp" drafts without
MLP_NAMES = ("mlp", "feed_forward", "block_sparse_moe", "ffn")
CACHE_KEYWORDS = ("cache", "past_key_values", "past_key_value", "layer_past")
# Learned absolute position embeddings added by the base model's forward (GPT-2, OPT, ...).
ABSOLUTE_POSITION_NAMES = ("wpe", "embed_positions", "position_embeddings")

try:  # the test transformers itself uses to route a model to its flash-attention path
    from transformers.utils.generic import is_flash_attention_requested as _hf_is_flash
except ImportError:  # older transformers: the same test, by name
    _hf_is_flash = None

# model -> {(dtype, device, attention implementation): embedding scale} for setups that passed
# the self-check (it costs a few short forwards: once per model and setup, not per request).
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _is_flash_attention(attn_implementation: str) -> bool:
    if _hf_is_flash is not None:
        return bool(_hf_is_flash(requested_attention_implementation=attn_implementation))
    return "flash" in attn_implementation


class UnsupportedModelError(ValueError):
    """The model cannot be driven layer by layer by clasp_ext."""


def _attr(module: nn.Module, names: tuple[str, ...]):
    for name in names:
        value = getattr(module, name, None)
        if value is not None:
            return value
    return None


def _zeros_like_input(hidden: Tensor, *args, **kwargs) -> Tensor:
    """An MLP block's forward under skip_unit="mlp": adds nothing to the residual."""
    return torch.zeros_like(hidden)


def _find_base(model: nn.Module) -> nn.Module:
    def has_parts(m) -> bool:
        return isinstance(m, nn.Module) and _attr(m, LAYERS_NAMES) is not None

    for name in BASE_NAMES:
        base = getattr(model, name, None)
        if has_parts(base) and _attr(base, EMBED_NAMES) is not None:
            return base
        inner = getattr(base, "language_model", None) if base is not None else None
        if has_parts(inner):  # multimodal wrappers: model.model.language_model
            return inner
    if has_parts(model) and _attr(model, EMBED_NAMES) is not None:
        return model
    raise UnsupportedModelError(
        f"clasp_ext: {type(model).__name__} has no decoder-layer list (looked for "
        f"model.{{{','.join(BASE_NAMES)}}}.{{{','.join(LAYERS_NAMES)}}}); only decoder-only causal "
        "LMs with a list of decoder layers are supported"
    )


@dataclass(frozen=True)
class LayerConvention:
    """How this transformers release and family call a decoder layer, read off its signature."""

    cache_keyword: str
    takes_cache_position: bool
    # ("position_embeddings",), ("position_embeddings_global", "position_embeddings_local") or ()
    rotary_keywords: tuple[str, ...]
    constant_kwargs: tuple[tuple[str, object], ...]  # use_cache=True, output_attentions=False, ...

    @classmethod
    def of(cls, layer: nn.Module) -> LayerConvention:
        params = inspect.signature(type(layer).forward).parameters
        name = type(layer).__name__
        cache_kw = next((k for k in CACHE_KEYWORDS if k in params), None)
        if cache_kw is None:
            raise UnsupportedModelError(
                f"clasp_ext: {name}.forward takes none of the cache keywords "
                f"{', '.join(CACHE_KEYWORDS)}; cannot hand it the shared KV cache"
            )
        if "attention_mask" not in params:
            raise UnsupportedModelError(f"clasp_ext: {name}.forward takes no attention_mask=")
        if "position_embeddings" in params:
            rotary = ("position_embeddings",)
        elif "position_embeddings_global" in params and "position_embeddings_local" in params:
            rotary = ("position_embeddings_global", "position_embeddings_local")
        else:
            rotary = ()  # the layer computes its rotary embedding from position_ids itself
        constants = [("use_cache", True), ("output_attentions", False), ("alibi", None)]
        constants = tuple((k, v) for k, v in constants if k in params)
        return cls(cache_kw, "cache_position" in params, rotary, constants)


class ModelAdapter:
    """Layer-by-layer access to a decoder-only causal LM (batch 1 in the decoder, any B here).

    Construction validates the model and, with ``check=True`` (the default), runs the self-check
    once per model and setup."""

    def __init__(self, model: nn.Module, check: bool = True):
        config = getattr(model, "config", None)
        if config is None:
            raise UnsupportedModelError(
                "clasp_ext: the model has no .config (not a transformers model?)"
            )
        if getattr(config, "is_encoder_decoder", False):
            raise UnsupportedModelError(
                f"clasp_ext: {type(model).__name__} is an encoder-decoder model; only decoder-only "
                "causal LMs are supported"
            )
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        if getattr(text_config, "use_bidirectional_attention", False):
            raise UnsupportedModelError(
                f"clasp_ext: {type(model).__name__} uses bidirectional attention; only causal "
                "decoders are supported"
            )
        self.model = model
        self.config = text_config
        self.base = base = _find_base(model)
        self.embed_tokens = _attr(base, EMBED_NAMES)
        self.layers = _attr(base, LAYERS_NAMES)
        self.norm = _attr(base, NORM_NAMES)
        self.rotary_emb = getattr(base, "rotary_emb", None)
        self.rotary_emb_local = getattr(base, "rotary_emb_local", None)  # Gemma 3 before 5.0
        lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        missing = [f"final norm ({'/'.join(NORM_NAMES)})"] if self.norm is None else []
        if lm_head is None or not hasattr(lm_head, "weight"):
            missing.append("output embedding (get_output_embeddings())")
        if missing:
            raise UnsupportedModelError(
                f"clasp_ext: {type(model).__name__} has no {' and no '.join(missing)}; cannot "
                "drive it layer by layer"
            )
        absolute = [
            n for n in ABSOLUTE_POSITION_NAMES if isinstance(getattr(base, n, None), nn.Module)
        ]
        if absolute:
            raise UnsupportedModelError(
                f"clasp_ext: {type(model).__name__} adds learned absolute position embeddings "
                f"({absolute[0]}) in its forward; only rotary / no-position models are supported"
            )
        if getattr(text_config, "alibi", False):
            raise UnsupportedModelError(
                f"clasp_ext: {type(model).__name__} uses ALiBi position biases; not supported"
            )
        self.lm_head = lm_head
        if not isinstance(self.layers, nn.ModuleList) or len(self.layers) == 0:
            raise UnsupportedModelError("clasp_ext: model layers is not a non-empty nn.ModuleList")
        self.num_layers = len(self.layers)
        n_cfg = getattr(text_config, "num_hidden_layers", self.num_layers)
        if n_cfg != self.num_layers:
            raise UnsupportedModelError(
                f"clasp_ext: config.num_hidden_layers={n_cfg} but the model has "
                f"{self.num_layers} layers (was the layer list shortened?)"
            )
        self.attn_modules = []
        for i, layer in enumerate(self.layers):
            attn = _attr(layer, ATTN_NAMES)
            if attn is None:
                raise UnsupportedModelError(
                    f"clasp_ext: layer {i} ({type(layer).__name__}) has no attention module "
                    f"({'/'.join(ATTN_NAMES)}): recurrent, linear-attention or hybrid models are "
                    "not supported"
                )
            if getattr(attn, "layer_idx", i) != i:
                raise UnsupportedModelError(
                    f"clasp_ext: layer {i} has attention layer_idx={attn.layer_idx}; the cache is "
                    "indexed by layer index"
                )
            self.attn_modules.append(attn)
        conventions = {LayerConvention.of(layer) for layer in self.layers}
        if len(conventions) != 1:
            raise UnsupportedModelError(
                "clasp_ext: the decoder layers have different forward signatures (a hybrid "
                "model); not supported"
            )
        self.convention = conventions.pop()
        if "position_embeddings" in self.convention.rotary_keywords and self.rotary_emb is None:
            raise UnsupportedModelError(
                f"clasp_ext: {type(self.layers[0]).__name__} takes position_embeddings but the "
                "base model has no rotary_emb module"
            )
        self.attn_implementation = getattr(text_config, "_attn_implementation", None) or "eager"
        self.is_flash = _is_flash_attention(self.attn_implementation)
        if self.attn_implementation not in SUPPORTED_ATTN and not self.is_flash:
            raise UnsupportedModelError(
                f"clasp_ext: attn_implementation={self.attn_implementation!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ATTN)} and flash_attention_2/3); load the "
                "model with attn_implementation='sdpa', 'eager' or 'flash_attention_2'"
            )
        if self.is_flash:
            # flash-attn takes no mask: causality comes only from the module's is_causal flag
            for i, attn in enumerate(self.attn_modules):
                if getattr(attn, "is_causal", True) is not True:
                    raise UnsupportedModelError(
                        f"clasp_ext: layer {i} attention is not causal (is_causal=False); "
                        "flash attention would then attend to future tokens"
                    )
        # The implementation the masked calls (the DP, ragged batches; see masked_attention) run
        # with: sdpa without per-head K/V copies (attention.py) for sdpa and flash models, and the
        # implementation the decoding forwards run with (layer_attention); and the config objects
        # the attention modules dispatch on (usually one, shared).
        sdpa_like = self.is_flash or self.attn_implementation == "sdpa"
        self.set_masked_attention(attention.register() if sdpa_like else self.attn_implementation)
        attn_configs = {id(text_config): text_config}
        for attn in self.attn_modules:
            cfg = getattr(attn, "config", None)
            if cfg is not None:
                attn_configs[id(cfg)] = cfg
        self._attn_configs = list(attn_configs.values())

        # Per-layer attention type and sliding window.
        layer_types = getattr(text_config, "layer_types", None)
        window = getattr(text_config, "sliding_window", None)
        self.layer_types: list[str] = []
        self.windows: list[int | None] = []
        for i in range(self.num_layers):
            lt = layer_types[i] if layer_types is not None else None
            if lt is None:
                lt = "sliding_attention" if window is not None else "full_attention"
            if lt not in ("full_attention", "sliding_attention"):
                raise UnsupportedModelError(
                    f"clasp_ext: layer {i} has attention type {lt!r}; only full_attention and "
                    "sliding_attention are supported"
                )
            self.layer_types.append(lt)
            self.windows.append(int(window) if lt == "sliding_attention" else None)
        if self.rotary_emb is not None:
            rotary_params = inspect.signature(self.rotary_emb.forward).parameters
            self.rotary_takes_type = "layer_type" in rotary_params
        else:
            self.rotary_takes_type = False

        # Scalings the CausalLM / base model forward applies around the layers.
        self.embedding_multiplier = getattr(text_config, "embedding_multiplier", None)
        if self.embedding_multiplier == 1.0:
            self.embedding_multiplier = None
        self.final_softcap = getattr(text_config, "final_logit_softcapping", None)
        self.logits_divisor = getattr(text_config, "logits_scaling", None)  # Granite
        if self.logits_divisor == 1.0:
            self.logits_divisor = None
        self.logit_scale = getattr(text_config, "logit_scale", None)  # Cohere
        if self.logit_scale == 1.0:
            self.logit_scale = None
        self.embed_scale: float | None = None  # a scale the base forward applies (self_check)
        self.ragged_error: str | None = None  # why ragged batches are refused (check_ragged)

        p = next(model.parameters())
        self.dtype = p.dtype
        self.device = p.device
        self.hidden_size = text_config.hidden_size
        self.vocab_size = lm_head.weight.shape[0]
        # what ``forward`` leaves out of a layer its ``skip`` marks: "layer" (all of it) or "mlp"
        # (its MLP block, one of ``_mlps``, found once by set_skip_unit)
        self.skip_unit = "layer"
        self._mlps: list[nn.Module] = []
        if check:
            self.check()

    def set_skip_unit(self, unit: str) -> None:
        """ "mlp": a layer marked in ``forward``'s ``skip`` runs its attention (which writes its
        K/V) with its MLP block returning zeros, so the residual adds nothing: the layer without
        its MLP in pre-norm, post-norm (RMSNorm of zero is zero) and parallel blocks alike. Only
        drafts pass ``skip``, so what is emitted never depends on it. Refuses (ValueError) a
        model whose layers have no MLP block it can find or that fail to run without one."""
        if unit == "layer":
            self.skip_unit = unit
            return
        mlps = self.mlp_blocks()
        missing = [i for i, m in enumerate(mlps) if m is None]
        if missing:
            raise ValueError(
                f"clasp_ext: skip_unit='mlp' needs an MLP block ({'/'.join(MLP_NAMES)}) in every "
                f"decoder layer; {type(self.layers[0]).__name__} layers {missing[:4]} have none. "
                "Use skip_unit='layer'"
            )
        self.skip_unit, self._mlps = unit, mlps
        cache = self.new_cache(4)
        ids = torch.zeros(1, 2, dtype=torch.long, device=self.device)
        try:
            with torch.no_grad():
                self.forward(ids, 0, cache, skip=[True] * self.num_layers)
        except Exception as e:  # noqa: BLE001 (what the layer raised, in the message)
            self.skip_unit = "layer"
            raise ValueError(
                f"clasp_ext: skip_unit='mlp': a {type(self.layers[0]).__name__} layer does not "
                f"run with its MLP block returning zeros ({type(e).__name__}: {e}); use "
                "skip_unit='layer'"
            ) from None

    def mlp_blocks(self) -> list[nn.Module | None]:
        """Each decoder layer's MLP block (None where it has none)."""
        return [_attr(layer, MLP_NAMES) for layer in self.layers]

    @contextlib.contextmanager
    def _without_mlp(self, i: int):
        mlp = self._mlps[i]
        mlp.forward = _zeros_like_input
        try:
            yield
        finally:
            mlp.__dict__.pop("forward", None)

    # ------------------------------------------------------------------ pieces of the forward
    def embed(self, input_ids: Tensor) -> Tensor:
        """h_0, with the scalings the model applies between its embedding and layer 0 (Gemma 3's
        scaled embedding module applies its own)."""
        h = self.embed_tokens(input_ids)
        if self.embedding_multiplier is not None:
            h = h * self.embedding_multiplier
        if self.embed_scale is not None:
            h = h * torch.tensor(self.embed_scale, dtype=h.dtype)
        return h

    def position_embeddings(self, hidden: Tensor, position_ids: Tensor) -> dict[str, tuple]:
        """Rotary (cos, sin) per layer type for ``position_ids`` [B, T] ({} without rotary)."""
        if not self.convention.rotary_keywords or self.rotary_emb is None:
            return {}
        types = sorted(set(self.layer_types))
        if self.rotary_takes_type:
            return {lt: self.rotary_emb(hidden, position_ids, layer_type=lt) for lt in types}
        if self.convention.rotary_keywords != ("position_embeddings",):  # global + local
            local = self.rotary_emb_local or self.rotary_emb
            return {
                "full_attention": self.rotary_emb(hidden, position_ids),
                "sliding_attention": local(hidden, position_ids),
            }
        pe = self.rotary_emb(hidden, position_ids)
        return dict.fromkeys(types, pe)

    @staticmethod
    def first_positions(pos_emb: dict, n: int) -> dict:
        """``pos_emb`` for the first ``n`` query positions: each value is a (cos, sin) pair or one
        tensor (DeepSeek-V2's complex frequencies), [B, T, ...]."""

        def take(x):
            return tuple(t[:, :n] for t in x) if isinstance(x, tuple) else x[:, :n]

        return {k: take(v) for k, v in pos_emb.items()}

    def run_layer(
        self,
        i: int,
        hidden: Tensor,
        position_ids: Tensor,
        pos_emb: dict[str, tuple],
        masks: dict[int | None, Tensor | None],
        cache,
    ) -> Tensor:
        """Layer i on ``hidden`` [B, T, d]; its attention writes K/V through ``cache.update``."""
        conv = self.convention
        kwargs = dict(conv.constant_kwargs)
        kwargs[conv.cache_keyword] = cache
        if conv.takes_cache_position and position_ids.shape[0] == 1:
            # one row's positions; a ragged batch has one set per row, so none is passed (the
            # ragged self-check refuses batches for a layer that needs it)
            kwargs["cache_position"] = position_ids[0]
        if conv.rotary_keywords == ("position_embeddings",):
            kwargs["position_embeddings"] = pos_emb.get(self.layer_types[i])
        elif conv.rotary_keywords:
            kwargs["position_embeddings_global"] = pos_emb["full_attention"]
            kwargs["position_embeddings_local"] = pos_emb["sliding_attention"]
        out = self.layers[i](
            hidden_states=hidden,
            attention_mask=masks[self.windows[i]],
            position_ids=position_ids,
            **kwargs,
        )
        if isinstance(out, tuple):  # older layer conventions: (hidden, attentions, ...)
            out = out[0]
        return out

    def final_norm(self, hidden: Tensor) -> Tensor:
        return self.norm(hidden)

    def softcap(self, logits: Tensor) -> Tensor:
        """What the CausalLM forward does to the lm_head output: Granite's division by
        ``logits_scaling``, Cohere's ``logit_scale``, Gemma's final softcapping."""
        if self.logits_divisor is not None:
            logits = logits / self.logits_divisor
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    def logits_from_normed(self, normed: Tensor) -> Tensor:
        return self.softcap(self.lm_head(normed))

    def head(self, hidden: Tensor) -> Tensor:
        return self.logits_from_normed(self.final_norm(hidden))

    def new_cache(self, capacity: int, batch: int | None = None) -> ClaspKVCache:
        return ClaspKVCache(self.num_layers, capacity, batch=batch)

    def forward(
        self,
        ids: Tensor,
        start: int | Tensor,
        cache,
        skip: list[bool] | None = None,
        keep_hidden: str | None = None,
        kv_len: int | None = None,
        tree=None,
    ) -> tuple[Tensor, list[Tensor]]:
        """The one layer-by-layer forward: ``ids`` [B, T] at positions ``start .. start + T - 1``
        over cache slots [0, start) (writing [start, start + T)), running the layers not marked in
        ``skip`` (and, with ``skip_unit`` "mlp", the marked ones without their MLP block).
        Returns (the last layer's output h [B, T, d] before the final norm, hidden states): with
        ``keep_hidden="all"`` [h_0 .. h_L], with ``"last"`` the same at the last position only,
        else [].

        Ragged batches (batch.py): ``start`` a device tensor [B] of per-row positions, and
        ``kv_len`` > every row's last position: row b's queries sit at ``start[b] ..`` and see its
        own slots up to themselves (``row_masks``). Those masks are arbitrary 4-D masks, so a
        flash-attention model runs this call through sdpa (``masked_attention``).

        A token tree (``tree``, branches.TokenTree; one sequence, int ``start``): node t sits at
        position ``start + tree.depth[t]`` in slot ``start + t`` and sees slots [0, start) and
        the nodes ``tree.visible[t]`` marks (``tree_masks``), through ``masked_attention``."""
        h, pos_ids, pe, masks = self.forward_inputs(ids, start, kv_len, tree)
        cache.set_write(start, kv_len)
        keep = (lambda x: x) if keep_hidden == "all" else (lambda x: x[:, -1:])
        hs = [keep(h)] if keep_hidden else []
        with self.layer_attention(start, tree is not None):
            for i in range(self.num_layers):
                if skip is None or not skip[i]:
                    h = self.run_layer(i, h, pos_ids, pe, masks, cache)
                elif self.skip_unit == "mlp":
                    with self._without_mlp(i):
                        h = self.run_layer(i, h, pos_ids, pe, masks, cache)
                if keep_hidden:
                    hs.append(keep(h))
        return h, hs

    def forward_inputs(
        self, ids: Tensor, start: int | Tensor, kv_len: int | None = None, tree=None
    ):
        """What every layer of ``forward`` reads besides the cache: (h_0 [B, T, d], position ids
        [B, T], rotary embeddings per layer type, masks per window). cuda_graphs.py captures this
        and each layer separately, so a draft replays any skip set layer by layer."""
        T = ids.shape[1]
        steps = torch.arange(T, device=ids.device)  # a kernel, not a host copy
        h = self.embed(ids)
        if tree is not None:
            if isinstance(start, Tensor) or T != tree.depth.shape[0]:
                raise ValueError("clasp_ext: a token tree needs one sequence and one id per node")
            pos_ids = (start + tree.depth)[None]
            masks = self.tree_masks(start, tree.depth, tree.visible)
        elif isinstance(start, Tensor):
            pos_ids = start[:, None].long() + steps
            masks = self.row_masks(pos_ids, kv_len)
        else:
            pos_ids = (start + steps)[None]
            masks = self.causal_masks(pos_ids[0], start + T, from_zero=start == 0)
        return h, pos_ids, self.position_embeddings(h, pos_ids), masks

    def layer_attention(self, start: int | Tensor, tree: bool = False):
        """The attention context the layers of a forward at ``start`` run in: ragged batches'
        per-row masks and token trees need ``masked_attention``; a one-sequence forward runs an
        sdpa model's layers with the packed grouped-query sdpa too (attention.py: no K/V copy
        per query head), a flash model's with flash attention."""
        if tree or isinstance(start, Tensor):
            return self.masked_attention()
        return self._attention(self.forward_attn_implementation)

    # ------------------------------------------------------------------ masks
    def _to_attn_mask(self, allowed: Tensor, attn_implementation: str) -> Tensor:
        """bool [T, S] (True = may attend) -> the 4-D mask [1, 1, T, S] the attention expects."""
        if attn_implementation in ("sdpa", attention.PACKED_GQA_SDPA):
            return allowed[None, None]
        zero = torch.zeros((), dtype=self.dtype, device=allowed.device)
        neg = torch.full((), torch.finfo(self.dtype).min, dtype=self.dtype, device=allowed.device)
        return torch.where(allowed, zero, neg)[None, None]

    def causal_masks(
        self, q_positions: Tensor, kv_len: int, from_zero: bool = False
    ) -> dict[int | None, Tensor | None]:
        """Masks for queries at ``q_positions`` [T] over cache slots [0, kv_len) where slot s holds
        position s: causal, and within the window for sliding layers. One per distinct window.

        Callers pass ``kv_len = last query position + 1``, and the cache hands attention the view
        ``[0, kv_len)`` (``set_write(start)`` with queries at ``start .. kv_len - 1``). Flash
        attention gets no mask (``None``, as transformers' own flash path does): its causal mask is
        aligned to the bottom right, i.e. the last query sees exactly the last key slot, which is
        this layout, and the attention module passes its own sliding window.

        ``from_zero``: the queries are every slot of the view (a prefill). sdpa then gets no mask
        where no window binds: transformers' sdpa runs it causal (``is_causal``), which skips the
        masked half and takes the flash kernel; with the mask a 969-token prefill of
        Qwen2.5-1.5B (bf16, AVX-512 EPYC) took 7.2-8.1 s against 6.7-7.5 s. One query (a draft
        step, a plain step) sees every slot of the view, so sdpa gets no mask there either, as
        transformers' own one-token steps do: no mask to build or read, and on a GPU the kernels
        that take none."""
        if self.is_flash:
            return dict.fromkeys(set(self.windows))
        sdpa = self.forward_attn_implementation in ("sdpa", attention.PACKED_GQA_SDPA)
        slots = torch.arange(kv_len, device=q_positions.device)
        q = q_positions[:, None]
        masks = {}
        unmasked = from_zero or q_positions.shape[0] == 1
        for w in set(self.windows):
            if unmasked and sdpa and (w is None or w >= kv_len):
                masks[w] = None
                continue
            allowed = slots[None, :] <= q
            if w is not None:
                allowed = allowed & (slots[None, :] > q - w)
            masks[w] = self._to_attn_mask(allowed, self.attn_implementation)
        return masks

    def row_masks(self, q_positions: Tensor, kv_len: int) -> dict[int | None, Tensor]:
        """Masks [B, 1, T, kv_len] for a ragged batch: row b's queries at ``q_positions[b]``
        see that row's slots up to their own position (within the window), nothing past it, so
        slots another row's longer sequence reaches are hidden. For
        ``masked_attn_implementation`` (the forward runs inside ``masked_attention()``)."""
        slots = torch.arange(kv_len, device=q_positions.device)
        q = q_positions[:, :, None]
        masks = {}
        for w in set(self.windows):
            allowed = slots <= q
            if w is not None:
                allowed = allowed & (slots > q - w)
            masks[w] = self._to_attn_mask(allowed, self.masked_attn_implementation)[0, 0][:, None]
        return masks

    def tree_masks(self, start: int, depth: Tensor, visible: Tensor) -> dict[int | None, Tensor]:
        """Masks [1, 1, T, start + T] for a token tree in slots [start, start + T): node t (at
        position start + depth[t]) sees the slots before ``start`` and the nodes ``visible``
        [T, T] marks (its ancestors and itself), those within its window on sliding layers.
        For ``masked_attn_implementation``."""
        T = depth.shape[0]
        slots = torch.arange(start, device=depth.device)
        q = (start + depth)[:, None]
        masks = {}
        for w in set(self.windows):
            past = (slots[None, :] < q).expand(T, start)
            nodes = visible
            if w is not None:
                past = past & (slots[None, :] > q - w)
                nodes = nodes & (depth[:, None] - depth[None, :] < w)
            allowed = torch.cat([past, nodes], 1)
            masks[w] = self._to_attn_mask(allowed, self.masked_attn_implementation)
        return masks

    def candidate_masks(
        self, target_pos: int | Tensor, scratch_start: int, num: int
    ) -> dict[int | None, Tensor]:
        """The DP layout (SPEC section 2): ``num`` queries, all at position ``target_pos``; query c
        attends to slots [0, target_pos - 1] (within the window) and to scratch slot
        ``scratch_start + c`` (itself), nothing else. Key length = scratch_start + num.
        ``target_pos`` may also be a tensor [num] of one position per query (query c then sees
        the slots before its own position: bench/bench_sublayer_dp.py's teacher-forced drafts).

        The masks are for ``masked_attn_implementation``: run the layers inside
        ``masked_attention()``."""
        kv_len = scratch_start + num
        slots = torch.arange(kv_len, device=self.device)
        own = scratch_start + torch.arange(num, device=self.device)
        pos = torch.as_tensor(target_pos, device=self.device).reshape(-1, 1)  # [1 or num, 1]
        masks = {}
        for w in set(self.windows):
            past = slots[None, :] < pos
            if w is not None:
                past = past & (slots[None, :] > pos - w)
            allowed = past.expand(num, kv_len) | (slots[None, :] == own[:, None])
            masks[w] = self._to_attn_mask(allowed, self.masked_attn_implementation)
        return masks

    @contextlib.contextmanager
    def masked_attention(self):
        """Within this block the decoder layers attend with ``masked_attn_implementation``, which
        takes an arbitrary 4-D mask (``candidate_masks``).

        For eager that is the model's own implementation; for sdpa the packed grouped-query
        sdpa (attention.py), the same attention without a K/V copy per query head. Flash
        attention has no mask argument: it only knows causal (bottom-right) + sliding window +
        padding, and the DP's layout (candidates that see neither each other nor cache slot p,
        the full model's own entry for the token they stand for) is none of these. So for the DP's
        call only, the attention modules are switched to the packed sdpa (same weights, same
        cache, same math) by the field transformers dispatches on,
        ``config._attn_implementation``, which the attention modules read on every call; it is
        restored on exit, also on error. The switch is visible to anything else running this model
        concurrently (another thread), as any ``set_attn_implementation`` would be."""
        with self._attention(self.masked_attn_implementation):
            yield

    @contextlib.contextmanager
    def _attention(self, implementation: str):
        """The attention modules dispatch to ``implementation`` within this block."""
        if implementation == self.attn_implementation:
            yield
            return
        saved = [(cfg, cfg._attn_implementation) for cfg in self._attn_configs]
        try:
            for cfg, _ in saved:
                cfg._attn_implementation = implementation
            yield
        finally:
            for cfg, impl in saved:
                cfg._attn_implementation = impl

    # ------------------------------------------------------------------ check
    def check(self) -> None:
        """The self-check, once per model and (dtype, device, attention implementation)."""
        key = (self.dtype, self.device, self.attn_implementation)
        done = _CHECKED.setdefault(self.model, {})
        if key not in done:
            packed = attention.PACKED_GQA_SDPA
            if self.masked_attn_implementation == packed and not self._packed_attention_runs():
                self.set_masked_attention("sdpa")
            self.self_check()
            done[key] = (self.embed_scale, self._ragged_error(), self.masked_attn_implementation)
        self.embed_scale, self.ragged_error, masked = done[key]
        self.set_masked_attention(masked)

    def set_masked_attention(self, implementation: str) -> None:
        """The attention the masked calls and (but on flash models) the decoding forwards run:
        ``attention.PACKED_GQA_SDPA`` or "sdpa" (the benchmarks compare them), or eager."""
        self.masked_attn_implementation = implementation
        self.forward_attn_implementation = (
            self.attn_implementation if self.is_flash else implementation
        )

    @torch.no_grad()
    def _packed_attention_runs(self) -> bool:
        """Whether every decoder layer's attention runs ``attention.packed_gqa_sdpa`` when the
        config names it: some families (Falcon) test for the name "sdpa" and run their own
        attention for any other name, which would then get masks it does not take."""
        ids = torch.zeros(1, 2, dtype=torch.long, device=self.device)
        cache = self.new_cache(4)

        def run(name):  # the one-sequence forward, its layers dispatching to ``name``
            saved = self.forward_attn_implementation
            self.forward_attn_implementation = name
            try:
                self.forward(ids, 0, cache)
            finally:
                self.forward_attn_implementation = saved

        try:
            return attention.packed_calls(run) == self.num_layers
        except Exception:  # noqa: BLE001 - a family's own path failing on the mask: not used
            return False

    def check_ragged(self) -> None:
        """Raises UnsupportedModelError where ragged batches (batch.py) are not exact on this
        model: the ragged self-check, run with the self-check, found a difference or a failure."""
        if self.ragged_error is not None:
            raise UnsupportedModelError(
                f"clasp_ext: batched decoding of {type(self.model).__name__} is not supported: "
                f"{self.ragged_error}; decode one sequence at a time (ClaspDecoder)"
            )

    @torch.no_grad()
    def _ragged_error(self) -> str | None:
        """Two rows at different lengths through one ragged forward (per-row positions, masks
        and cache slots) against the model's own forward on each row: None if every logit
        matches, else what differed. Run once per model and setup, after the self-check."""
        try:
            lens = (7, 4)
            n = max(lens) + 2
            rows = [
                (torch.arange(n, device=self.device) * (3 + b) + 5) % self.vocab_size
                for b in (0, 1)
            ]
            cache = self.new_cache(n + 1, batch=2)
            for b, m in enumerate(lens):
                self.forward(rows[b][None, :m], 0, cache.row(b))
            ids = torch.stack([rows[b][m : m + 2] for b, m in enumerate(lens)])
            starts = torch.tensor(lens, device=self.device)
            h, _ = self.forward(ids, starts, cache, kv_len=max(lens) + 2)
            got = self.head(h).float()
            for b, m in enumerate(lens):
                ref = self.model(input_ids=rows[b][None, : m + 2], use_cache=True).logits.float()
                diff = (got[b] - ref[0, m : m + 2]).abs().max().item()
                tol = self._tolerance(ref)
                if not diff <= tol:
                    return f"rows at their own positions differ from the model by {diff:.3g}"
        except Exception as err:  # noqa: BLE001 - any failure: batches are refused, not rows
            return f"the ragged forward failed ({type(err).__name__}: {err})"
        return None

    @torch.no_grad()
    def self_check(self) -> float:
        """Compares the adapter with the model's own forward and raises UnsupportedModelError if
        they differ or the adapter's calls fail (a family quirk this adapter does not know).

        Three chunks through the cache (a multi-token prefill, a multi-token verify-like chunk and
        a one-token draft-like step over the cached K/V), long enough to cross a small sliding
        window; every position's logits must match the model's own forward, every layer must have
        written its K/V through the cache on every chunk (a cache keyword the layer swallows in
        ``**kwargs`` fails here), and the DP's candidate layout must match single-token calls.
        Returns the max abs logit difference."""
        name = type(self.model).__name__
        try:
            return self._self_check()
        except UnsupportedModelError:
            raise
        except Exception as err:  # any failure of the layer-by-layer calls refuses the model
            raise UnsupportedModelError(
                f"clasp_ext: driving {name} layer by layer failed in the self-check "
                f"({type(err).__name__}: {err}); this family has a calling convention or cache "
                "layout the adapter does not know"
            ) from err

    def _tolerance(self, ref: Tensor) -> float:
        scale = ref.abs().max().item() + 1.0
        return (1e-4 if self.dtype == torch.float32 else 5e-2) * scale

    def _self_check(self) -> float:
        name = type(self.model).__name__
        windows = [w for w in self.windows if w is not None]
        n = min(max(6, (min(windows) + 3) if windows else 0), 64)
        ids = (torch.arange(n, device=self.device)[None] * 7 + 3) % self.vocab_size
        ref, layer0_input = self._reference_forward(ids)
        self._measure_embed_scale(ids, layer0_input)

        cache = self.new_cache(n + 3)
        chunks = [(0, n - 3), (n - 3, n - 1), (n - 1, n)]
        got = []
        for c, (start, end) in enumerate(chunks):
            h, _ = self.forward(ids[:, start:end], start, cache)
            got.append(self.head(h).float())
            not_written = [i for i, w in enumerate(cache.writes) if w != c + 1]
            if not_written:  # checked per chunk: the next chunk would read the missing K/V
                raise UnsupportedModelError(
                    f"clasp_ext: the attention of {name} layer(s) {not_written} did not write K/V "
                    f"through the cache passed as {self.convention.cache_keyword}= (writes per "
                    f"layer: {cache.writes}); this transformers release calls layers differently"
                )
        got = torch.cat(got, 1)
        diff = (got - ref).abs().max().item()
        tol = self._tolerance(ref)
        if not diff <= tol:
            raise UnsupportedModelError(
                f"clasp_ext: the layer-by-layer forward of {name} does not reproduce the model's "
                f"own logits (max abs diff {diff:.3g} > {tol:.3g}); this family has a quirk the "
                "adapter does not know, so CLaSp cannot be lossless on it"
            )
        self._check_candidate_layout(ids, cache, n)
        return diff

    def _reference_forward(self, ids: Tensor) -> tuple[Tensor, Tensor | None]:
        """The model's own logits, and the hidden state it feeds layer 0 (hooked)."""
        seen = []

        def hook(module, args, kwargs):
            seen.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

        handle = self.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            # with the model's own cache, as model.generate's prefill runs it (in some releases
            # use_cache=False takes another path that gives other logits: DeepSeek-V3 in 4.56)
            ref = self.model(input_ids=ids, use_cache=True).logits.float()
        finally:
            handle.remove()
        return ref, (seen[0] if seen else None)

    def _measure_embed_scale(self, ids: Tensor, layer0_input: Tensor | None) -> None:
        """A constant the base model multiplies the embeddings by before layer 0 (Gemma 1/2 before
        transformers 5: sqrt(hidden_size) in the hidden dtype), found by comparing what the model
        fed layer 0 with ``embed``; anything else that differs is refused."""
        self.embed_scale = None
        if layer0_input is None:
            return
        ours = self.embed(ids)
        if torch.equal(ours, layer0_input):
            return
        scale = math.sqrt(self.hidden_size)
        if torch.equal(ours * torch.tensor(scale, dtype=ours.dtype), layer0_input):
            self.embed_scale = scale
            return
        raise UnsupportedModelError(
            f"clasp_ext: {type(self.model).__name__} transforms the token embeddings before its "
            "first layer in a way the adapter does not know (not a known scale); not supported"
        )

    def _check_candidate_layout(self, ids: Tensor, cache, n: int) -> None:
        """The DP's call (two candidates at the last position p, each seeing slots [0, p) and its
        own scratch slot) equals two single-token calls at p over the same past: the model honours
        the 4-D mask and the repeated position ids."""
        p = n - 1
        if p < 1:
            return
        layer = 0
        cand = torch.cat([self.embed(ids[:, p : p + 1]), self.embed(ids[:, :1])], 1)  # [1, 2, d]
        pos_ids = torch.full((1, 2), p, dtype=torch.long, device=self.device)
        pe = self.position_embeddings(cand, pos_ids)
        scratch = n + 1
        with self.masked_attention():
            cache.set_write(scratch)
            both = self.run_layer(
                layer, cand, pos_ids, pe, self.candidate_masks(p, scratch, 2), cache
            )
        singles = []
        for c in range(2):
            one = cand[:, c : c + 1]
            pe1 = self.first_positions(pe, 1)
            cache.set_write(p)
            masks = self.causal_masks(torch.full((1,), p, device=self.device), p + 1)
            singles.append(self.run_layer(layer, one, pos_ids[:, :1], pe1, masks, cache))
        want = torch.cat(singles, 1).float()
        diff = (both.float() - want).abs().max().item()
        tol = self._tolerance(want)
        if not diff <= tol:
            raise UnsupportedModelError(
                f"clasp_ext: {type(self.model).__name__} does not honour the skip-set search's "
                f"attention layout (candidates at one position with a custom mask differ from "
                f"single-token calls by {diff:.3g} > {tol:.3g}); not supported"
            )
