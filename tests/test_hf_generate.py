"""model.generate(..., custom_generate=clasp_ext.hf.generate) behaves as plain model.generate."""

from __future__ import annotations

import functools

import pytest
import torch
import transformers as tf
from decoding_models import FAMILIES, tiny_model
from packaging.version import Version
from test_decoding_greedy import assert_lossless
from test_decoding_sampling import assert_matches
from transformers.generation import (
    LogitsProcessor,
    LogitsProcessorList,
    MaxLengthCriteria,
    StoppingCriteria,
    StoppingCriteriaList,
)

from clasp_ext import hf
from clasp_ext.decoding import ClaspConfig

torch.set_num_threads(1)

TF = Version(tf.__version__)
# Measured on the installed releases: 4.56 is the first to call a callable custom_generate; 4.57
# added passing the keyword arguments the callable names in its signature (and stopped passing
# `streamer` to it).
pytestmark = pytest.mark.skipif(
    TF < Version("4.56"), reason=f"transformers {TF} has no callable custom_generate (4.56+)"
)
needs_extra_kwargs = pytest.mark.skipif(
    TF < Version("4.57"),
    reason=f"transformers {TF} rejects unknown generate kwargs; bind them with functools.partial",
)

# CLaSp settings that make every round draft (and reject) on these tiny models
KNOBS = dict(num_skip_layers=2, max_draft=4, draft_exit_threshold=0.0, update_interval=2)


def clasp(**knobs):
    """The callable with knobs bound: works on every release with the hook."""
    return functools.partial(hf.generate, **{**KNOBS, **knobs})


def prompt(T: int, seed: int, vocab: int = 256) -> torch.Tensor:
    return torch.randint(3, vocab, (1, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_greedy_equals_generate(family):
    model = tiny_model(family, layers=6, seed=3)
    for trial, T in enumerate((5, 17)):
        ids = prompt(T, trial)
        kw = dict(do_sample=False, max_new_tokens=28, min_new_tokens=28, pad_token_id=0)
        want = model.generate(ids, **kw)
        got = model.generate(ids, custom_generate=clasp(seed=trial), **kw)
        assert got.shape == want.shape
        assert_lossless(model, got[0].tolist(), want[0].tolist(), T)


@needs_extra_kwargs
@torch.no_grad()
def test_knobs_as_generate_kwargs():
    model = tiny_model("llama", layers=6, seed=1)
    ids = prompt(8, 1)
    want = model.generate(ids, max_new_tokens=20, min_new_tokens=20)
    for kw in (KNOBS, dict(clasp_config=ClaspConfig(**KNOBS)), dict(skip_strategy=[1, 3])):
        got = model.generate(
            ids, max_new_tokens=20, min_new_tokens=20, custom_generate=hf.generate, **kw
        )
        assert_lossless(model, got[0].tolist(), want[0].tolist(), 8)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@torch.no_grad()
def test_processors_greedy(family):
    """Processors that read the sequence so far, on drafts and verify rows alike; a draft
    vocabulary smaller than the model's (64 of 256 ids) takes the -inf-padded path."""
    model = tiny_model(family, layers=6, seed=5)
    ids = prompt(10, 2)
    for kw in (
        dict(repetition_penalty=1.5),
        dict(no_repeat_ngram_size=2, min_new_tokens=12),
        dict(bad_words_ids=[[40], [41, 42]], suppress_tokens=[7, 8, 9], min_length=14),
        dict(sequence_bias={(50,): 4.0}, begin_suppress_tokens=[60]),
    ):
        kw = dict(kw, do_sample=False, max_new_tokens=24)
        want = model.generate(ids, **kw)
        got = model.generate(ids, custom_generate=clasp(draft_vocab_size=64), **kw)
        assert_lossless(model, got[0].tolist(), want[0].tolist(), 10)


def left_padded(lens: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch of prompts of these lengths (row b: ``prompt(n, seed + b)``) and its
    attention mask."""
    T = max(lens)
    ids = torch.zeros(len(lens), T, dtype=torch.long)
    mask = torch.zeros(len(lens), T, dtype=torch.long)
    for b, n in enumerate(lens):
        ids[b, T - n :], mask[b, T - n :] = prompt(n, seed + b)[0], 1
    return ids, mask


def _first_new_tokens(model, ids, n):
    out = model.generate(ids, do_sample=False, max_new_tokens=n, min_new_tokens=n)
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_eos_and_max_length(family):
    model = tiny_model(family, layers=6, seed=11)
    ids = prompt(6, 4)
    free = _first_new_tokens(model, ids, 30)
    firsts = [i for i, t in enumerate(free) if t not in free[:i]]
    eos = free[firsts[min(3, len(firsts) - 1)]]  # first appears mid-generation
    for eos_ids in (eos, [255, eos]):
        want = model.generate(ids, max_new_tokens=30, eos_token_id=eos_ids)
        got = model.generate(ids, max_new_tokens=30, eos_token_id=eos_ids, custom_generate=clasp())
        assert got[0].tolist() == want[0].tolist() == ids[0].tolist() + free[: free.index(eos) + 1]
    # max_length counts the prompt, as in plain generate
    got = model.generate(ids, max_length=15, eos_token_id=None, custom_generate=clasp())
    assert got[0, 6:].tolist() == free[:9]


class StopOn(StoppingCriteria):
    """Stops once the last token is ``token`` (a user criterion transformers knows nothing of)."""

    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
@torch.no_grad()
def test_stopping_criteria_stop_at_the_same_token(family):
    model = tiny_model(family, layers=6, seed=2)
    ids = prompt(7, 5)
    free = _first_new_tokens(model, ids, 30)
    # several stop tokens: wherever they fall in a round, generation stops right after them
    for stop in sorted(set(free[2:20]), key=free.index)[:4]:
        kw = dict(
            max_new_tokens=30,
            min_new_tokens=30,
            stopping_criteria=StoppingCriteriaList([StopOn(stop)]),
        )
        want = model.generate(ids, **kw)
        got = model.generate(ids, custom_generate=clasp(), **kw)
        assert got[0].tolist() == want[0].tolist()
        assert got[0, -1].item() == stop and got.shape[1] == 7 + free.index(stop) + 1
    # a user MaxLengthCriteria takes precedence over max_new_tokens, as in plain generate
    crit = StoppingCriteriaList([MaxLengthCriteria(max_length=7 + 11)])
    got = model.generate(
        ids, max_new_tokens=30, min_new_tokens=30, stopping_criteria=crit, custom_generate=clasp()
    )
    assert got[0, 7:].tolist() == free[:11]


@torch.no_grad()
def test_return_dict_scores_and_logits():
    model = tiny_model("llama", layers=6, seed=7)
    ids = prompt(9, 6)
    kw = dict(
        max_new_tokens=16,
        min_new_tokens=16,
        repetition_penalty=1.3,  # processed scores differ from the raw logits
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
    want = model.generate(ids, **kw)
    got = model.generate(ids, custom_generate=clasp(), **kw)
    assert type(got) is type(want)
    assert got.sequences.tolist() == want.sequences.tolist()
    assert len(got.scores) == len(want.scores) == 16 == len(got.logits)
    for a, b in zip(got.scores, want.scores, strict=True):
        assert a.shape == b.shape == (1, 256) and a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for a, b in zip(got.logits, want.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # sequences only, unless asked
    out = model.generate(ids, max_new_tokens=4, custom_generate=clasp())
    assert isinstance(out, torch.Tensor)


class Recorder:
    """transformers' streamer protocol (BaseStreamer): put(token ids), then end()."""

    def __init__(self):
        self.puts, self.ends = [], 0

    def put(self, value):
        assert self.ends == 0
        self.puts.append(value.tolist())

    def end(self):
        self.ends += 1

    def new_tokens(self):
        return [t for p in self.puts[1:] for t in p]


@torch.no_grad()
def test_streaming():
    model = tiny_model("gemma3", layers=6, seed=4)
    ids = prompt(6, 7)
    free = _first_new_tokens(model, ids, 20)
    stop = StoppingCriteriaList([StopOn(free[12])])  # the stream must not run past the stop
    kw = dict(max_new_tokens=20, min_new_tokens=20, stopping_criteria=stop)
    rec = Recorder()
    out = model.generate(ids, custom_generate=clasp(clasp_streamer=rec), **kw)
    assert rec.puts[0] == ids.tolist()  # the prompt first, as model.generate does
    assert rec.new_tokens() == out[0, 6:].tolist() == free[: free.index(free[12]) + 1]
    assert rec.ends == 1 and len(rec.puts) > 2

    rec = Recorder()
    model.generate(ids, custom_generate=hf.generate, streamer=rec, **kw)
    if TF < Version("4.57"):  # passed to the callable
        assert rec.new_tokens() == out[0, 6:].tolist() and rec.ends == 1
    else:  # not passed: transformers puts only the prompt (hence clasp_streamer)
        assert rec.puts == [ids.tolist()] and rec.ends == 0
        rec = Recorder()  # clasp_streamer as a generate kwarg (4.57+ passes it through)
        model.generate(ids, custom_generate=hf.generate, clasp_streamer=rec, **kw)
        assert rec.new_tokens() == out[0, 6:].tolist() and rec.ends == 1


class Custom(LogitsProcessor):
    def __call__(self, input_ids, scores):
        return scores


@torch.no_grad()
def test_refusals():
    model = tiny_model("llama", layers=4, seed=0)
    ids = prompt(5, 8)
    g = clasp()

    def refused(match, inputs=ids, custom_generate=g, **kw):
        with pytest.raises(ValueError, match=match):
            model.generate(inputs, max_new_tokens=4, custom_generate=custom_generate, **kw)

    refused("repeat the prompt in the batch", do_sample=True, num_return_sequences=2)
    # (bound with the callable: transformers 4.56 passes generate's extra kwargs to the model)
    streaming = clasp(clasp_streamer=object())
    refused("with a batch .* streamer", inputs=ids.repeat(2, 1), custom_generate=streaming)
    refused(
        "with a batch .* output_scores",
        inputs=ids.repeat(2, 1),
        return_dict_in_generate=True,
        output_scores=True,
    )
    refused(
        "EncoderNoRepeatNGramLogitsProcessor is not supported with a batch",
        inputs=ids.repeat(2, 1),
        logits_processor=LogitsProcessorList(
            [tf.generation.EncoderNoRepeatNGramLogitsProcessor(2, ids.repeat(2, 1))]
        ),
    )
    refused("UnbatchedClassifierFreeGuidanceLogitsProcessor.*guidance_scale", guidance_scale=1.5)
    refused("Custom is not supported", logits_processor=LogitsProcessorList([Custom()]))
    refused("beam search", num_beams=2)
    refused("from the generation config", custom_generate=clasp(clasp_config=ClaspConfig(top_k=3)))
    # an all-ones mask is fine
    mask = torch.ones_like(ids)
    assert model.generate(ids, attention_mask=mask, max_new_tokens=4, custom_generate=g).shape == (
        1,
        9,
    )


@torch.no_grad()
def test_sampling_distribution(monkeypatch):
    """Under do_sample with temperature, top-k, no_repeat_ngram_size=1 (no token twice: each
    position must see its own prefix) and min_new_tokens (no EOS), the first token and the joint
    of the second and third match the exact processed model (chi-square, p = 1e-4). With max_draft
    2 the second token is an accepted draft or a resample, the third a bonus or a new round's."""
    V = 8
    model = tiny_model("llama", layers=4, vocab=V, seed=5)
    model.lm_head.weight.mul_(3.0)  # draft (layers 1, 2 skipped) and target far apart
    ids = torch.tensor([[3, 1]])
    kw = dict(do_sample=True, temperature=0.8, top_k=4, no_repeat_ngram_size=1, min_new_tokens=3)
    kw.update(max_new_tokens=3)

    built = {}

    def spy(model, input_ids, logits_processor=None, **_):
        built["procs"] = logits_processor
        return input_ids

    model.generate(ids, custom_generate=spy, **kw)  # the processors plain generate would use

    def probs(seq):
        return built["procs"](seq, model(seq).logits[:, -1].float()).softmax(-1)

    p1 = probs(ids)[0]
    seq2 = torch.cat([ids.expand(V, -1), torch.arange(V)[:, None]], 1)
    p12 = p1[:, None] * probs(seq2)  # [t1, t2]
    seq3 = torch.cat([seq2.repeat_interleave(V, 0), torch.arange(V).repeat(V)[:, None]], 1)
    p23 = (p12[:, :, None] * probs(seq3).view(V, V, V)).sum(0)  # [t2, t3]

    decoders = []

    class Recording(hf.ClaspDecoder):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            decoders.append(self)

    monkeypatch.setattr(hf, "ClaspDecoder", Recording)
    g = clasp(skip_strategy=[1, 2], max_draft=2, lookup_ngram=0)
    N = 1200
    counts = torch.zeros(V, V, V, dtype=torch.long)
    for _ in range(N):
        out = model.generate(ids, custom_generate=g, **kw)
        assert out.shape == (1, 5)
        counts[tuple(out[0, 2:].tolist())] += 1
    drafted = sum(d.stats.drafted for d in decoders)
    accepted = sum(d.stats.accepted for d in decoders)
    assert min(accepted, drafted - accepted) > 0.1 * drafted, (accepted, drafted)
    assert_matches(counts.sum((1, 2)), p1, "token 1")
    # tokens 2 and 3 jointly: the third is only right if its verify row saw the second
    c23, p23 = counts.sum(0).flatten(), p23.flatten()
    rare = (p23 > 0) & (p23 * N < 5)  # pooled, so the chi-square approximation holds
    assert_matches(
        torch.cat([c23[~rare], c23[rare].sum()[None]]),
        torch.cat([p23[~rare], p23[rare].sum()[None]]),
        "tokens 2, 3",
    )


@pytest.mark.parametrize("family", ("llama", "gemma3"))
@torch.no_grad()
def test_left_padded_batch(family):
    """A left-padded batch through model.generate(custom_generate=...): each row as plain
    generate's on that prompt alone (near-ties aside), pads after a row's EOS, same shape."""
    model = tiny_model(family, layers=6, seed=8)
    lens = (4, 11, 7)
    T = max(lens)
    ids, mask = left_padded(lens, 20)
    rows = [prompt(n, 20 + b) for b, n in enumerate(lens)]
    kw = dict(do_sample=False, max_new_tokens=16, pad_token_id=0)
    got = model.generate(ids, attention_mask=mask, custom_generate=clasp(), **kw)
    want = model.generate(ids, attention_mask=mask, **kw)
    assert got.shape[0] == 3 and torch.equal(got[:, :T], ids)
    for b, row in enumerate(rows):
        alone = model.generate(row, **kw)[0].tolist()
        new = got[b, T:].tolist()
        n_new = len(alone) - lens[b]
        assert_lossless(model, row[0].tolist() + new[:n_new], alone, lens[b])
        assert all(x == 0 for x in new[n_new:])
    # as wide as the longest row (plain generate stops when every row is done), like want
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos)

    def width(seqs):
        lengths = []
        for row in seqs[:, T:].tolist():
            stop = next((i for i, t in enumerate(row) if t in eos), len(row) - 1)
            lengths.append(stop + 1)
        return max(lengths)

    assert got.shape[1] == T + width(got) and want.shape[1] == T + width(want)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@torch.no_grad()
def test_left_padded_batch_with_processors(family):
    """Processors on a left-padded batch apply per row to the row as plain generate shows it (its
    pads, prompt and tokens: min_length counts the pads), with each row's slice of what
    transformers built for the batch (the repetition penalty's per-row prompt padding, the
    encoder repetition penalty's prompt ids, prefix_allowed_tokens_fn's batch id): each row
    equals plain generate's row of the same batch, near-ties aside."""
    model = tiny_model(family, layers=6, seed=9)
    lens = (5, 12, 8)
    T = max(lens)
    ids, mask = left_padded(lens, 40)
    for kw in (
        dict(repetition_penalty=1.5),
        dict(no_repeat_ngram_size=2, min_new_tokens=10),
        dict(min_length=T + 8, suppress_tokens=[7, 8, 9]),
        dict(encoder_repetition_penalty=1.6),
        # each row its own allowed tokens: a wrong batch id shows in the output
        dict(prefix_allowed_tokens_fn=lambda b, _ids: list(range(10 + 30 * b, 40 + 30 * b))),
    ):
        kw = dict(kw, do_sample=False, max_new_tokens=16, pad_token_id=0)
        want = model.generate(ids, attention_mask=mask, **kw)
        got = model.generate(ids, attention_mask=mask, custom_generate=clasp(), **kw)
        assert torch.equal(got[:, :T], ids)
        for b, n in enumerate(lens):
            row_got = got[b, T - n :].tolist()
            row_want = want[b, T - n :].tolist()
            m = min(len(row_got), len(row_want))
            assert_lossless(model, row_got[:m], row_want[:m], n)
            if "prefix_allowed_tokens_fn" in kw:
                assert all(10 + 30 * b <= t < 40 + 30 * b for t in got[b, T:].tolist() if t)


@torch.no_grad()
def test_left_padded_batch_with_stopping_criteria():
    """A user stopping criterion on a left-padded batch is checked per row after each token:
    the row that meets it ends right there and is padded after, the others go on; as plain
    generate on the same batch."""
    model = tiny_model("qwen2", layers=6, seed=2)
    lens = (6, 10, 8)
    T = max(lens)
    ids, mask = left_padded(lens, 60)
    kw = dict(do_sample=False, max_new_tokens=20, min_new_tokens=20, pad_token_id=0)
    free = model.generate(ids, attention_mask=mask, **kw)[:, T:].tolist()
    stop = next(t for t in free[1][3:] if t not in free[1][:3] and t != 0)
    crit = StoppingCriteriaList([StopOn(stop)])
    want = model.generate(ids, attention_mask=mask, stopping_criteria=crit, **kw)
    got = model.generate(
        ids, attention_mask=mask, stopping_criteria=crit, custom_generate=clasp(), **kw
    )
    assert got.shape == want.shape
    for b, n in enumerate(lens):
        assert_lossless(model, got[b, T - n :].tolist(), want[b, T - n :].tolist(), n)
    row = got[1, T:].tolist()
    end = row.index(stop) + 1
    assert end == free[1].index(stop) + 1 and all(t == 0 for t in row[end:])
