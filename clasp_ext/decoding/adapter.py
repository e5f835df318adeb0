"""Drives a Hugging Face decoder-only causal LM layer by layer.

This is the only module that knows transformers internals (attribute names, the decoder-layer
calling convention, rotary modules, per-layer attention types, final logit softcapping). When a
transformers release changes them, this file is the one to fix.

Supported: any ``*ForCausalLM`` whose base model exposes ``embed_tokens``, a ``layers`` ModuleList
of decoder layers called as ``layer(hidden_states=, attention_mask=, position_ids=,
position_embeddings=, cache=, use_cache=)`` whose attention writes through ``cache.update(key,
value, layer_idx, ...)``, a final ``norm`` and a ``rotary_emb`` (tested: Llama, Qwen2, Mistral,
Gemma 3). Lossless-ness does not rest on this file knowing every quirk of a family:
``ModelAdapter.self_check`` compares the adapter's logits with the model's own forward and refuses
a model where they differ.

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

import torch
from torch import Tensor, nn

SUPPORTED_ATTN = ("eager", "sdpa")  # plus the flash-attention family, see _is_flash_attention

try:  # the test transformers itself uses to route a model to its flash-attention path
    from transformers.utils.generic import is_flash_attention_requested as _hf_is_flash
except ImportError:  # older transformers: the same test, by name
    _hf_is_flash = None


def _is_flash_attention(attn_implementation: str) -> bool:
    if _hf_is_flash is not None:
        return bool(_hf_is_flash(requested_attention_implementation=attn_implementation))
    return "flash" in attn_implementation


class UnsupportedModelError(ValueError):
    """The model cannot be driven layer by layer by clasp_ext."""


def _find_base(model: nn.Module) -> nn.Module:
    for name in ("model", "transformer", "language_model"):
        base = getattr(model, name, None)
        if isinstance(base, nn.Module) and hasattr(base, "layers"):
            return base
        # multimodal wrappers: model.model.language_model
        inner = getattr(base, "language_model", None) if base is not None else None
        if isinstance(inner, nn.Module) and hasattr(inner, "layers"):
            return inner
    if hasattr(model, "layers") and hasattr(model, "embed_tokens"):
        return model
    raise UnsupportedModelError(
        f"clasp_ext: {type(model).__name__} has no decoder-layer list (looked for "
        "model.model.layers / model.transformer.layers / model.language_model.layers); "
        "only decoder-only causal LMs with a list of decoder layers are supported"
    )


class ModelAdapter:
    """Layer-by-layer access to a decoder-only causal LM (batch 1 in the decoder, any B here)."""

    def __init__(self, model: nn.Module):
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
        self.base = _find_base(model)
        base = self.base
        missing = [
            name
            for name in ("embed_tokens", "layers", "norm", "rotary_emb")
            if getattr(base, name, None) is None
        ]
        lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if lm_head is None:
            missing.append("lm_head (get_output_embeddings())")
        if missing:
            raise UnsupportedModelError(
                f"clasp_ext: {type(model).__name__} is missing {', '.join(missing)}; "
                "cannot drive it layer by layer"
            )
        self.embed_tokens = base.embed_tokens
        self.layers = base.layers
        self.norm = base.norm
        self.rotary_emb = base.rotary_emb
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
        for i, layer in enumerate(self.layers):
            attn = getattr(layer, "self_attn", None)
            if attn is None:
                raise UnsupportedModelError(
                    f"clasp_ext: layer {i} ({type(layer).__name__}) has no self_attn: recurrent, "
                    "linear-attention or hybrid models are not supported"
                )
            if getattr(attn, "layer_idx", i) != i:
                raise UnsupportedModelError(
                    f"clasp_ext: layer {i} has self_attn.layer_idx={attn.layer_idx}; the cache is "
                    "indexed by layer index"
                )
        params = inspect.signature(type(self.layers[0]).forward).parameters
        for name in ("attention_mask", "position_embeddings"):
            if name not in params and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
                raise UnsupportedModelError(
                    f"clasp_ext: {type(self.layers[0]).__name__}.forward takes no {name}="
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
            for i, layer in enumerate(self.layers):
                if getattr(layer.self_attn, "is_causal", True) is not True:
                    raise UnsupportedModelError(
                        f"clasp_ext: layer {i} attention is not causal (is_causal=False); "
                        "flash attention would then attend to future tokens"
                    )
        # The implementation the DP's masked call runs with (see masked_attention), and the
        # config objects the attention modules dispatch on (usually one, shared).
        self.masked_attn_implementation = "sdpa" if self.is_flash else self.attn_implementation
        attn_configs = {id(text_config): text_config}
        for layer in self.layers:
            cfg = getattr(layer.self_attn, "config", None)
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
        rotary_params = inspect.signature(self.rotary_emb.forward).parameters
        self.rotary_takes_type = "layer_type" in rotary_params
        self.final_softcap = getattr(text_config, "final_logit_softcapping", None)
        p = next(model.parameters())
        self.dtype = p.dtype
        self.device = p.device
        attn0 = self.layers[0].self_attn
        self.head_dim = getattr(attn0, "head_dim", None) or getattr(text_config, "head_dim", None)
        if self.head_dim is None:
            self.head_dim = text_config.hidden_size // text_config.num_attention_heads
        self.num_kv_heads = getattr(text_config, "num_key_value_heads", None) or (
            text_config.num_attention_heads
        )
        self.hidden_size = text_config.hidden_size
        self.vocab_size = lm_head.weight.shape[0]

    # ------------------------------------------------------------------ pieces of the forward
    def embed(self, input_ids: Tensor) -> Tensor:
        """h_0 (the embedding module applies any embedding scale itself, e.g. Gemma 3)."""
        return self.embed_tokens(input_ids)

    def position_embeddings(self, hidden: Tensor, position_ids: Tensor) -> dict[str, tuple]:
        """Rotary (cos, sin) per layer type for ``position_ids`` [B, T]."""
        if self.rotary_takes_type:
            return {
                lt: self.rotary_emb(hidden, position_ids, layer_type=lt)
                for lt in sorted(set(self.layer_types))
            }
        pe = self.rotary_emb(hidden, position_ids=position_ids)
        return {lt: pe for lt in set(self.layer_types)}

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
        out = self.layers[i](
            hidden_states=hidden,
            attention_mask=masks[self.windows[i]],
            position_ids=position_ids,
            position_embeddings=pos_emb[self.layer_types[i]],
            cache=cache,
            use_cache=True,
        )
        if isinstance(out, tuple):  # older layer conventions
            out = out[0]
        return out

    def final_norm(self, hidden: Tensor) -> Tensor:
        return self.norm(hidden)

    def softcap(self, logits: Tensor) -> Tensor:
        """The model's final logit softcapping (Gemma), or the logits unchanged."""
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    def logits_from_normed(self, normed: Tensor) -> Tensor:
        return self.softcap(self.lm_head(normed))

    def head(self, hidden: Tensor) -> Tensor:
        return self.logits_from_normed(self.final_norm(hidden))

    # ------------------------------------------------------------------ masks
    def _to_attn_mask(self, allowed: Tensor, attn_implementation: str) -> Tensor:
        """bool [T, S] (True = may attend) -> the 4-D mask [1, 1, T, S] the attention expects."""
        if attn_implementation == "sdpa":
            return allowed[None, None]
        zero = torch.zeros((), dtype=self.dtype, device=allowed.device)
        neg = torch.full((), torch.finfo(self.dtype).min, dtype=self.dtype, device=allowed.device)
        return torch.where(allowed, zero, neg)[None, None]

    def causal_masks(self, q_positions: Tensor, kv_len: int) -> dict[int | None, Tensor | None]:
        """Masks for queries at ``q_positions`` [T] over cache slots [0, kv_len) where slot s holds
        position s: causal, and within the window for sliding layers. One per distinct window.

        Callers pass ``kv_len = last query position + 1``, and the cache hands attention the view
        ``[0, kv_len)`` (``set_write(start)`` with queries at ``start .. kv_len - 1``). Flash
        attention gets no mask (``None``, as transformers' own flash path does): its causal mask is
        aligned to the bottom right, i.e. the last query sees exactly the last key slot, which is
        this layout, and the attention module passes its own sliding window."""
        if self.is_flash:
            return dict.fromkeys(set(self.windows))
        slots = torch.arange(kv_len, device=q_positions.device)
        q = q_positions[:, None]
        masks = {}
        for w in set(self.windows):
            allowed = slots[None, :] <= q
            if w is not None:
                allowed = allowed & (slots[None, :] > q - w)
            masks[w] = self._to_attn_mask(allowed, self.attn_implementation)
        return masks

    def candidate_masks(
        self, target_pos: int, scratch_start: int, num: int
    ) -> dict[int | None, Tensor]:
        """The DP layout (SPEC section 2): ``num`` queries, all at position ``target_pos``; query c
        attends to slots [0, target_pos - 1] (within the window) and to scratch slot
        ``scratch_start + c`` (itself), nothing else. Key length = scratch_start + num.

        The masks are for ``masked_attn_implementation``: run the layers inside
        ``masked_attention()``."""
        kv_len = scratch_start + num
        slots = torch.arange(kv_len, device=self.device)
        own = scratch_start + torch.arange(num, device=self.device)
        masks = {}
        for w in set(self.windows):
            past = slots < target_pos
            if w is not None:
                past = past & (slots > target_pos - w)
            allowed = past[None, :].expand(num, kv_len) | (slots[None, :] == own[:, None])
            masks[w] = self._to_attn_mask(allowed, self.masked_attn_implementation)
        return masks

    @contextlib.contextmanager
    def masked_attention(self):
        """Within this block the decoder layers attend with ``masked_attn_implementation``, which
        takes an arbitrary 4-D mask (``candidate_masks``).

        For eager and sdpa that is the model's own implementation and nothing changes. Flash
        attention has no mask argument: it only knows causal (bottom-right) + sliding window +
        padding, and the DP's layout (candidates that see neither each other nor cache slot p,
        the full model's own entry for the token they stand for) is none of these. So for the DP's
        call only, the attention modules are switched to sdpa (same weights, same cache, same
        math) by the field transformers dispatches on, ``config._attn_implementation``, which the
        attention modules read on every call; it is restored on exit, also on error. The switch is
        visible to anything else running this model concurrently (another thread), as any
        ``set_attn_implementation`` would be."""
        if self.masked_attn_implementation == self.attn_implementation:
            yield
            return
        saved = [(cfg, cfg._attn_implementation) for cfg in self._attn_configs]
        try:
            for cfg, _ in saved:
                cfg._attn_implementation = self.masked_attn_implementation
            yield
        finally:
            for cfg, impl in saved:
                cfg._attn_implementation = impl

    # ------------------------------------------------------------------ check
    @torch.no_grad()
    def self_check(self, cache_factory, num_tokens: int = 5, atol: float | None = None) -> float:
        """Runs the model's own forward and the adapter on the same few tokens and raises
        UnsupportedModelError if the logits differ (a family quirk this adapter does not know).
        Returns the max abs difference."""
        ids = torch.arange(1, num_tokens + 1, device=self.device)[None] % self.vocab_size
        ref = self.model(input_ids=ids, use_cache=False).logits.float()
        cache = cache_factory(num_tokens)
        pos = torch.arange(num_tokens, device=self.device)
        h = self.embed(ids)
        pe = self.position_embeddings(h, pos[None])
        masks = self.causal_masks(pos, num_tokens)
        cache.set_write(0)
        for i in range(self.num_layers):
            h = self.run_layer(i, h, pos[None], pe, masks, cache)
        got = self.head(h).float()
        diff = (got - ref).abs().max().item()
        scale = ref.abs().max().item() + 1.0
        tol = atol if atol is not None else (1e-4 if self.dtype == torch.float32 else 5e-2) * scale
        if not diff <= tol:
            raise UnsupportedModelError(
                f"clasp_ext: the layer-by-layer forward of {type(self.model).__name__} does not "
                f"reproduce the model's own logits (max abs diff {diff:.3g} > {tol:.3g}); this "
                "family has a quirk the adapter does not know, so CLaSp cannot be lossless on it"
            )
        return diff
