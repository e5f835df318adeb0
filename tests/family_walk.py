"""Every causal-LM family of the installed transformers, built tiny with random weights, either
decodes losslessly with CLaSp or is refused up front with UnsupportedModelError.

``check_family(model_type)`` returns a ``FamilyResult``; tests/test_decoding_families.py asserts on
it for every entry of transformers' causal-LM mapping. Run as a script, it prints the table of
README's "Supported models" (``python tests/family_walk.py > table.md``).
"""

from __future__ import annotations

import inspect
import sys
import warnings
from dataclasses import dataclass

import torch

# Small sizes for whichever of these a config takes (unknown names are left alone).
TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rotary_dim=8,  # GPT-J / CodeGen
    max_position_embeddings=256,
    sliding_window=8,
    # mixture of experts
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    n_shared_experts=1,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
    # Gemma 3n / 4 per-layer input embeddings
    vocab_size_per_layer_input=256,
    hidden_size_per_layer_input=16,
    # multi-head latent attention (DeepSeek)
    kv_lora_rank=16,
    q_lora_rank=24,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    # non-default scalings (Granite's multipliers, Cohere's logit scale), so they are exercised
    embedding_multiplier=3.0,
    logits_scaling=2.5,
    residual_multiplier=0.5,
    attention_multiplier=0.2,
    logit_scale=0.5,
    # token ids inside the tiny vocabulary
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
MAX_PARAMS = 40_000_000  # a family whose sizes TINY does not reach is skipped, not built at scale
PROMPT_LEN = 7
NEW_TOKENS = 12
NEAR_TIE = 1e-4


@dataclass
class FamilyResult:
    model_type: str
    status: str  # "works", "refused", "not built" (no tiny model: not a CLaSp verdict)
    reason: str = ""


def _mapping() -> dict[str, str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def model_types() -> list[str]:
    return sorted(_mapping())


def _init_params(cls) -> set[str] | None:
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return None  # takes anything
    return set(params)


def _tiny_kwargs(config_cls) -> dict:
    """TINY under the names this config class uses (its attribute_map: GPT-2's n_embd, ...), for
    the sizes it has."""
    accepted = _init_params(config_cls)
    defaults = config_cls()
    alias = getattr(config_cls, "attribute_map", {})  # e.g. hidden_size -> n_embd
    kwargs = {}
    for name, value in TINY.items():
        own = alias.get(name, name)
        prop = getattr(config_cls, own, None)
        if isinstance(prop, property) and prop.fset is None:  # derived (Falcon's head_dim)
            continue
        generic = name.endswith("_token_id")  # some 5.0 configs lack them; models read them
        if generic or (accepted is not None and own in accepted) or hasattr(defaults, own):
            kwargs[own] = value
    if getattr(defaults, "sliding_window", None) is None:
        kwargs.pop("sliding_window", None)
    if "kv_lora_rank" in kwargs:  # MLA: rotary head size qk_rope_head_dim, no grouped K/V heads
        kwargs.pop("head_dim", None)
        if "num_key_value_heads" in kwargs:
            kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
    return kwargs


def tiny_model(model_type: str, attn: str = "sdpa"):
    """A random fp32 model of the family (raises if transformers cannot build one this small)."""
    import transformers as tf
    from transformers import CONFIG_MAPPING, PretrainedConfig

    config_cls = CONFIG_MAPPING[model_type]
    model_cls = getattr(tf, _mapping()[model_type])
    kwargs = _tiny_kwargs(config_cls)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = config_cls(**kwargs)
        for name, sub in list(vars(config).items()):  # composite configs: shrink the parts too
            if isinstance(sub, PretrainedConfig):
                setattr(config, name, type(sub)(**_tiny_kwargs(type(sub))))
        config._attn_implementation = attn
        with torch.device("meta"):  # count first: a default-sized model would not fit in memory
            size = sum(p.numel() for p in model_cls(config).parameters())
        if size > MAX_PARAMS:
            raise MemoryError(f"{size / 1e6:.0f}M parameters with the tiny sizes; not built")
        model = model_cls(config).float().eval()
    # random-init models are near-uniform; sharpen them so greedy decoding is far from ties
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name and p.dim() == 2:
                p.mul_(3.0 if "embed" in name or "lm_head" in name else 1.5)
    return model


def _greedy_reference(model, ids) -> list[int]:
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0].tolist()


def _first_difference(model, got: list[int], want: list[int]) -> str | None:
    """None when equal or the first difference is a near-tie of the full model (SPEC section 4),
    else a description."""
    if got == want:
        return None
    i = next((j for j, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
    if i is None:
        return f"lengths differ: {len(got)} vs {len(want)}"
    with torch.no_grad():
        logits = model(torch.tensor([got[:i]])).logits[0, -1].float()
    top2 = torch.topk(logits, 2).values
    gap = float(top2[0] - top2[1])
    if gap < NEAR_TIE:
        return None
    return f"token {i - PROMPT_LEN} differs: {got[i]} vs model.generate's {want[i]} (gap {gap:.3g})"


@torch.no_grad()
def check_family(model_type: str) -> FamilyResult:
    """Builds the family tiny and decodes with CLaSp. Raises AssertionError on a wrong token;
    any exception from CLaSp other than UnsupportedModelError propagates (a crash in the loop)."""
    from clasp_ext.decoding import ClaspDecoder, UnsupportedModelError

    built = None
    for attn in ("sdpa", "eager"):
        try:
            built = tiny_model(model_type, attn)
            break
        except Exception as err:  # noqa: BLE001  (no tiny model of this family: not our verdict)
            reason = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
    if built is None:
        return FamilyResult(model_type, "not built", reason)
    model = built
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() else 256
    ids = torch.randint(
        3, min(vocab, 256), (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1)
    )
    try:
        want = _greedy_reference(model, ids)
    except Exception as err:  # noqa: BLE001  (the model's own generate fails: nothing to compare)
        return FamilyResult(model_type, "not built", f"model.generate fails: {type(err).__name__}")
    try:
        dec = ClaspDecoder(
            model,
            num_skip_layers=1,
            max_draft=3,
            draft_exit_threshold=0.0,
            update_interval=1,
            max_new_tokens=NEW_TOKENS,
            eos_token_id=[],
        )
    except UnsupportedModelError as err:
        return FamilyResult(model_type, "refused", str(err).removeprefix("clasp_ext: "))
    got = dec.generate(ids).sequences[0].tolist()
    problem = _first_difference(model, got, want)
    assert problem is None, f"{model_type}: CLaSp output differs from model.generate: {problem}"
    return FamilyResult(model_type, "works", type(model).__name__)


def main() -> None:
    import transformers

    print(f"Families of transformers {transformers.__version__}'s causal-LM mapping, tiny random")
    print("fp32 models (`python tests/family_walk.py`):\n")
    print("| family | verdict | model class / reason |")
    print("|---|---|---|")
    for mt in model_types():
        try:
            r = check_family(mt)
        except AssertionError as err:
            r = FamilyResult(mt, "WRONG TOKENS", str(err))
        except Exception as err:  # noqa: BLE001
            r = FamilyResult(mt, "CRASH", f"{type(err).__name__}: {err}")
        reason = r.reason.replace("|", "/").replace("\n", " ")
        print(f"| {mt} | {r.status} | {reason} |", flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
