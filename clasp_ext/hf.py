"""CLaSp inside ``model.generate``: ``model.generate(ids, custom_generate=clasp_ext.hf.generate)``.

transformers (4.56 and later) accepts a callable as ``custom_generate``: ``generate`` prepares the
generation config, the logits processors and the stopping criteria as usual, then hands them to
the callable instead of its own decoding loop. This module is that callable: it maps what
transformers prepared onto a ``ClaspDecoder`` and returns what plain ``generate`` would
(``sequences``, or a ``GenerateDecoderOnlyOutput`` with ``scores``/``logits``).

- Greedy or sampling (``do_sample``, ``temperature``, ``top_k``, ``top_p``), ``max_new_tokens`` /
  ``max_length``, ``eos_token_id`` (int or list), ``min_new_tokens``, ``repetition_penalty`` and the
  other processors that are pure functions of (input_ids, scores) (``_PURE_PROCESSORS``): they are
  applied to every drafted and verified position with its own prefix, so the output is the
  processed full model's, as with plain ``generate``. Others (classifier-free guidance,
  watermarking, custom processor classes) are refused with a ValueError.
- Stopping criteria: max length and EOS run inside the loop; any other criterion is evaluated
  after every emitted token on the sequence so far, so generation stops at the same token as
  plain ``generate``.
- CLaSp knobs: ``clasp_config=ClaspConfig(...)`` and/or the individual keyword arguments of
  ``generate`` below. transformers 4.57+ passes through the keyword arguments a callable names in
  its signature; on 4.56 bind them with ``functools.partial(clasp_ext.hf.generate, ...)``.
- Streaming: transformers 4.57+ does not hand ``streamer=`` to a callable (it only puts the
  prompt into it); pass ``clasp_streamer=`` instead (any object with ``put``/``end``, e.g.
  ``TextStreamer``). On 4.56 ``streamer=`` works as well.
- Batches: ``input_ids`` [B, T] with a left-padded ``attention_mask`` run through
  ``batch.generate_batch`` (each row its own sequence, pads after its EOS, as plain generate);
  there the processors and stopping criteria apply per row (to the row as plain generate shows
  it: its padding, prompt and tokens); no streamer, no scores.
  No beam search.
"""

from __future__ import annotations

import copy

import torch
from transformers.generation import (
    GenerateDecoderOnlyOutput,
    LogitsProcessorList,
    StoppingCriteriaList,
)
from transformers.generation import logits_process as _lp
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

from clasp_ext.decoding.batch import generate_batch
from clasp_ext.decoding.config import ClaspConfig
from clasp_ext.decoding.loop import ClaspDecoder

# Processors that are pure functions of (input_ids, scores): CLaSp scores positions out of order
# (a draft token, then the verify rows, rejected ones included), so a processor with state (one
# that counts its calls, keeps a cache, or runs a model) would see a different history than in
# plain generate. Exact types: a subclass may add state.
_PURE_PROCESSORS = tuple(
    cls
    for cls in (
        getattr(_lp, name, None)
        for name in (
            "RepetitionPenaltyLogitsProcessor",
            "EncoderRepetitionPenaltyLogitsProcessor",
            "NoRepeatNGramLogitsProcessor",
            "EncoderNoRepeatNGramLogitsProcessor",
            "NoBadWordsLogitsProcessor",
            "SequenceBiasLogitsProcessor",
            "MinLengthLogitsProcessor",
            "MinNewTokensLengthLogitsProcessor",
            "PrefixConstrainedLogitsProcessor",  # assumes prefix_allowed_tokens_fn is pure
            "ForcedBOSTokenLogitsProcessor",
            "ForcedEOSTokenLogitsProcessor",
            "InfNanRemoveLogitsProcessor",
            "ExponentialDecayLengthPenalty",
            "SuppressTokensLogitsProcessor",
            "SuppressTokensAtBeginLogitsProcessor",
            "LogitNormalization",
            "TemperatureLogitsWarper",
            "TopKLogitsWarper",
            "TopPLogitsWarper",
            "MinPLogitsWarper",
            "TypicalLogitsWarper",
            "EpsilonLogitsWarper",
            "EtaLogitsWarper",
            "TopHLogitsWarper",  # transformers 5.x
        )
    )
    if cls is not None
)
# Processors transformers builds for the whole batch hold per-row state; a batch row is scored
# alone ([1, n] ids), so each row gets a copy with its own slice (_row_processors). This one keeps
# its n-grams per row in a form not sliced here: refused for batches.
_BATCH_REFUSED = ("EncoderNoRepeatNGramLogitsProcessor",)
# what to tell the user for the refused processors transformers builds from a generation option
_REFUSED_HINTS = {
    "UnbatchedClassifierFreeGuidanceLogitsProcessor": "guidance_scale",
    "WatermarkLogitsProcessor": "watermarking_config",
    "SynthIDTextWatermarkLogitsProcessor": "watermarking_config",
}
# ClaspConfig fields that model.generate's own arguments and generation config decide
_FROM_GENERATION_CONFIG = ("temperature", "top_k", "top_p", "max_new_tokens", "eos_token_id")
# model kwargs transformers adds for its own loop; CLaSp runs its own forward passes and cache
_IGNORED_MODEL_KWARGS = ("use_cache", "logits_to_keep")
_CACHE_KWARGS = ("cache", "past_key_values")


@torch.no_grad()
def generate(
    model,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList | None = None,
    stopping_criteria: StoppingCriteriaList | None = None,
    generation_config=None,
    synced_gpus: bool = False,
    streamer=None,
    *,
    clasp_config: ClaspConfig | None = None,
    clasp_streamer=None,
    num_skip_layers: int | None = None,
    skip_ratio: float | None = None,
    max_draft: int | None = None,
    draft_exit_threshold: float | None = None,
    update_interval: int | None = None,
    draft_vocab_size: int | None = None,
    lookup_ngram: int | None = None,
    skip_strategy=None,
    seed: int | None = None,
    **model_kwargs,
):
    """The ``custom_generate`` callable: ``model.generate(ids, custom_generate=generate, ...)``.

    The positional arguments are what transformers passes. ``clasp_config`` and the named knobs
    (see ``ClaspConfig``; a knob overrides the same field of ``clasp_config``) set CLaSp; the
    sampling and length settings come from the generation config. ``clasp_streamer``: an object
    with ``put(token_ids)``/``end()`` that receives the prompt, then the tokens as they are
    emitted. ``seed``: when unset in sampling mode, one is drawn from torch's global generator, so
    ``torch.manual_seed`` before the call makes a run reproducible (as for plain ``generate``).
    """
    gc = generation_config
    if gc is None:
        raise TypeError(
            "clasp_ext.hf.generate is called by transformers: use "
            "model.generate(input_ids, custom_generate=clasp_ext.hf.generate, ...), or "
            "clasp_ext.generate(model, input_ids) directly"
        )
    mask = _check_request(input_ids, gc, synced_gpus, model_kwargs)
    if streamer is not None and clasp_streamer is not None:
        raise ValueError("clasp_ext.hf.generate: pass streamer or clasp_streamer, not both")
    processors = logits_processor if logits_processor is not None else LogitsProcessorList()
    criteria = stopping_criteria if stopping_criteria is not None else StoppingCriteriaList()
    T = input_ids.shape[1]
    max_length, eos, other_criteria = _split_criteria(criteria, gc)
    hook, temperature, top_k, top_p = _split_processors(processors)

    config = clasp_config if clasp_config is not None else ClaspConfig()
    if not isinstance(config, ClaspConfig):
        name = type(config).__name__
        raise TypeError(f"clasp_ext.hf.generate: clasp_config must be a ClaspConfig, got {name}")
    clash = [f for f in _FROM_GENERATION_CONFIG if getattr(config, f) is not None]
    if clash:
        raise ValueError(
            f"clasp_ext.hf.generate: clasp_config sets {clash}; with model.generate these come "
            "from the generation config: pass them to model.generate itself (max_new_tokens=..., "
            "do_sample=True, temperature=..., eos_token_id=...)"
        )
    knobs = dict(
        num_skip_layers=num_skip_layers,
        skip_ratio=skip_ratio,
        max_draft=max_draft,
        draft_exit_threshold=draft_exit_threshold,
        update_interval=update_interval,
        draft_vocab_size=draft_vocab_size,
        lookup_ngram=lookup_ngram,
        skip_strategy=skip_strategy,
        seed=seed,
    )
    config = config.replace(**{k: v for k, v in knobs.items() if v is not None})
    if gc.do_sample and config.seed is None:
        config = config.replace(seed=int(torch.randint(2**62, ())))
    config = config.replace(
        temperature=temperature if gc.do_sample else 0.0,
        top_k=top_k,
        top_p=top_p,
        # plain generate always runs one step, even when the prompt already fills max_length
        max_new_tokens=max(1, max_length - T),
        eos_token_id=eos,
    )
    output_scores = bool(gc.return_dict_in_generate and gc.output_scores)
    output_logits = bool(gc.return_dict_in_generate and getattr(gc, "output_logits", False))
    padded = mask is not None and not bool((mask == 1).all())
    if input_ids.shape[0] > 1 or padded or config.cuda_graphs:  # the batched loop
        unsupported = [
            name
            for name, used in (
                ("output_scores / output_logits", output_scores or output_logits),
                ("streamer / clasp_streamer", streamer is not None or clasp_streamer is not None),
            )
            if used
        ]
        if unsupported:
            raise ValueError(
                f"clasp_ext.hf.generate: with a batch (batch size {input_ids.shape[0]}), "
                f"padding or cuda_graphs, {', '.join(unsupported)} are not supported yet; call "
                "generate once per prompt, without cuda_graphs, for them"
            )
        out = generate_batch(
            model,
            input_ids,
            config,
            attention_mask=mask,
            pad_token_id=gc.pad_token_id,
            row_logits_processors=None
            if hook is None
            else [_row_processors(hook, b, input_ids.shape[0]) for b in range(input_ids.shape[0])],
            stopping_criteria=other_criteria or None,
        )
        sequences = out.sequences.to(input_ids.device)
        if gc.return_dict_in_generate:
            return GenerateDecoderOnlyOutput(sequences=sequences)
        return sequences
    dec = ClaspDecoder(
        model, config, logits_processor=hook, keep_logits=output_scores or output_logits
    )

    # transformers 4.56 passes `streamer` after putting the prompt into it itself
    if clasp_streamer is not None:
        clasp_streamer.put(input_ids.cpu())
    streamer = clasp_streamer if clasp_streamer is not None else streamer
    ids = input_ids.to(dec.device)
    seq = ids.new_empty(1, T + config.max_new_tokens)
    seq[:, :T] = ids
    n = T
    scores = () if output_scores else None
    raw_logits = () if output_logits else None
    new = dec.prefill(ids)
    stopped = False
    while new:
        seq[0, n : n + len(new)] = torch.tensor(new)
        kept = len(new)
        for i in range(len(new)):
            p = n + i  # this token's position; seq[:, :p] is what the model saw
            if output_scores or output_logits:
                row = dec.token_logits[p - T][None]
                if output_logits:
                    raw_logits += (row,)
                if output_scores:  # the processed scores, as plain generate records them
                    scores += (processors(seq[:, :p], row.clone()),)
            # plain generate checks the criteria after each token: stop at the same one
            if other_criteria and bool(other_criteria(seq[:, : p + 1], scores).any()):
                kept, stopped = i + 1, True
                break
        if streamer is not None:
            streamer.put(torch.tensor(new[:kept]))
        n += kept
        if stopped or dec.finished:
            break
        new = dec.step()
    if streamer is not None:
        streamer.end()

    sequences = seq[:, :n].to(input_ids.device)
    if gc.return_dict_in_generate:
        return GenerateDecoderOnlyOutput(sequences=sequences, scores=scores, logits=raw_logits)
    return sequences


def _check_request(input_ids, gc, synced_gpus, model_kwargs):
    """Refuses, with what to do instead, what CLaSp cannot do as plain generate would; returns
    the attention mask (or None)."""

    def refuse(msg: str):
        raise ValueError(f"clasp_ext.hf.generate: {msg}")

    if getattr(gc, "num_beams", 1) not in (None, 1):
        refuse(f"num_beams={gc.num_beams}: beam search is not supported (use num_beams=1)")
    if getattr(gc, "num_return_sequences", 1) not in (None, 1):
        refuse(
            f"num_return_sequences={gc.num_return_sequences} is not supported; repeat the "
            "prompt in the batch instead (input_ids.repeat(n, 1), sampled rows draw "
            "independently)"
        )
    if getattr(gc, "prompt_lookup_num_tokens", None) or getattr(gc, "assistant_early_exit", None):
        refuse(
            "prompt_lookup_num_tokens / assistant_early_exit: CLaSp is its own speculative "
            "decoder (its lookup_ngram knob drafts from the context); drop them"
        )
    if gc.return_dict_in_generate and (gc.output_attentions or gc.output_hidden_states):
        refuse("output_attentions / output_hidden_states are not supported (only scores, logits)")
    if synced_gpus:
        refuse("synced_gpus (FSDP / DeepSpeed ZeRO-3) is not supported")
    if "inputs_embeds" in model_kwargs or input_ids.shape[1] == 0:
        refuse("inputs_embeds are not supported; pass input_ids")
    mask = model_kwargs.pop("attention_mask", None)
    pos = model_kwargs.pop("position_ids", None)
    if pos is not None:  # transformers derives them from the mask: 0.. over each row's tokens
        m = torch.ones_like(input_ids) if mask is None else mask.to(input_ids.device)
        want = m.long().cumsum(-1) - 1
        pos = pos.to(input_ids.device).expand_as(input_ids)
        if not torch.equal(pos[m == 1], want[m == 1]):
            refuse("custom position_ids are not supported (positions are 0.. over each prompt)")
    for name in _CACHE_KWARGS:
        cache = model_kwargs.pop(name, None)
        if cache is not None and cache.get_seq_length() > 0:
            refuse("continuing from a filled cache is not supported; pass the whole prompt")
    for name in _IGNORED_MODEL_KWARGS:
        model_kwargs.pop(name, None)
    if model_kwargs:
        refuse(f"model kwargs {sorted(model_kwargs)} are not supported")
    return mask


def _split_criteria(criteria, gc):
    """(max_length, EOS ids, the other criteria): the loop itself stops exactly at the first two."""
    max_length, eos, rest = None, [], StoppingCriteriaList()
    for c in criteria:
        if type(c) is MaxLengthCriteria:
            max_length = c.max_length if max_length is None else min(max_length, c.max_length)
        elif type(c) is EosTokenCriteria:
            eos += [int(e) for e in c.eos_token_id.flatten().tolist() if int(e) not in eos]
        else:
            rest.append(c)
    if max_length is None:
        max_length = gc.max_length
    if max_length is None:
        raise ValueError("clasp_ext.hf.generate: set max_new_tokens or max_length")
    return max_length, eos, rest


def _row_processors(processors: LogitsProcessorList, b: int, B: int) -> LogitsProcessorList:
    """Row b's view of processors transformers built for a batch of B rows, to score that row
    alone ([1, n] ids, as batch.py does): per-row tensors sliced to row b (repetition penalty's
    prompt padding lengths, transformers 5.x; the encoder repetition penalty's prompt ids) and
    a prefix_allowed_tokens_fn asked about batch id b."""
    rows = []
    for p in processors:
        name = type(p).__name__
        if name in _BATCH_REFUSED:
            raise ValueError(
                f"clasp_ext.hf.generate: the logits processor {name} is not supported with a "
                "batch; call generate once per prompt for it"
            )
        q = copy.copy(p)
        for attr in ("prompt_ignore_length", "encoder_input_ids"):
            v = getattr(p, attr, None)
            if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == B:
                setattr(q, attr, v[b : b + 1])
        fn = getattr(p, "_prefix_allowed_tokens_fn", None)
        if fn is not None:
            q._prefix_allowed_tokens_fn = lambda _batch_id, ids, _fn=fn, _b=b: _fn(_b, ids)
        rows.append(q)
    return LogitsProcessorList(rows)


def _split_processors(processors):
    """(a processor for every position or None, temperature, top_k, top_p).

    transformers appends temperature, top-k and top-p last, in that order; those become the
    ClaspConfig values (process_logits applies them the same way, batched over the verify rows).
    What precedes them runs per position through ClaspDecoder's logits_processor hook.
    """
    procs = list(processors)
    for p in procs:
        if type(p) not in _PURE_PROCESSORS:
            name = type(p).__name__
            option = _REFUSED_HINTS.get(name)
            raise ValueError(
                f"clasp_ext.hf.generate: the logits processor {name} is not supported: CLaSp "
                "scores drafted and verified positions out of order, so it applies only "
                "processors that are pure functions of (input_ids, scores) (e.g. "
                "repetition_penalty, no_repeat_ngram_size, min_new_tokens, bad_words_ids, "
                "suppress_tokens, temperature/top_k/top_p). "
                + (f"Unset {option}" if option else "Drop it")
                + " or use plain model.generate."
            )
    if procs and type(procs[-1]) is _lp.LogitNormalization:
        procs.pop()  # a log-softmax: changes neither the argmax nor the softmax
    temperature, top_k, top_p = 1.0, 0, 1.0
    inf = float("-inf")
    if procs and type(procs[-1]) is _lp.TopPLogitsWarper:
        w = procs[-1]
        if w.min_tokens_to_keep == 1 and w.filter_value == inf:
            top_p = float(procs.pop().top_p)
    # (TopKLogitsWarper.top_k already includes its min_tokens_to_keep)
    if procs and type(procs[-1]) is _lp.TopKLogitsWarper and procs[-1].filter_value == inf:
        top_k = int(procs.pop().top_k)
    if procs and type(procs[-1]) is _lp.TemperatureLogitsWarper:
        temperature = float(procs.pop().temperature)
    return (LogitsProcessorList(procs) if procs else None), temperature, top_k, top_p
