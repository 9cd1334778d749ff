"""Inputs of a causal trace: checked arguments, target tokens, noise, clean and corrupted runs.

The procedure follows ROME's ``experiments/causal_trace.py`` (Meng et al. 2022, §2.1):
Gaussian noise ``ε ~ N(0, ν²)`` is added to the token embeddings of the subject in
``samples`` copies of the prompt (the *corrupted* runs); ``ν = 3σ`` where ``σ`` is the
standard deviation of subject-token embeddings over a set of facts (ROME's ``s3`` default).
Noise draws come from a generator seeded with ``seed``: every cell of a trace sees the same
draws (ROME reuses ``RandomState(1)``), and a trace is reproducible by default.

Targets: ``p(target)`` is the probability of the *whole* target sequence,
``p(y₁…y_m | prompt) = Π_k p(y_k | prompt, y_<k)`` (teacher-forced; for one token this is
ROME's metric). Without a target, the clean run's top-1 next token is used.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvlens.models.kvmodel import Batch, KVModel, Site
from kvlens.prompts import SubjectSpan, continuation_ids, subject_span
from kvlens.tracing import Record, Remote, Write, record, run

#: Subjects over which the default noise scale is measured (ROME pools its ``knowns`` subjects).
DEFAULT_SUBJECTS: tuple[str, ...] = (
    "The Eiffel Tower", "the Colosseum", "The Great Wall", "The Mona Lisa", "Romeo and Juliet",
    "The Statue of Liberty", "The Golden Gate Bridge", "The Taj Mahal", "Toyota", "The iPhone",
    "Germany", "France", "Japan", "Kenya", "Vladimir Putin", "Barack Obama", "Albert Einstein",
    "Microsoft", "the Louvre", "Big Ben", "Mount Everest", "the Amazon River", "Pablo Picasso",
    "William Shakespeare", "Lionel Messi", "the Nile", "Google", "Nintendo", "BMW", "Canada",
    "Leonardo da Vinci", "the Sahara", "Beethoven", "Harry Potter", "Wolfgang Amadeus Mozart",
    "Apple", "Samsung", "Italy", "Brazil", "Isaac Newton",
)
#: Clean target probability below which a trace warns that there is little to explain.
LOW_CLEAN_PROBABILITY = 1e-3


def noise_scale(model: KVModel, subjects: Sequence[str] | None = None, remote: Remote | None = None) -> float:
    """σ: the standard deviation of the token embeddings of ``subjects`` (all entries pooled).

    ROME's ``collect_embedding_std`` over its known facts. It reads ~100 embedding rows, so it
    is computed each time (no cache to go stale when the model or its tokenizer changes).
    """
    subjects = tuple(subjects or DEFAULT_SUBJECTS)
    ids = [i for s in subjects for i in model.tokenizer(s, add_special_tokens=False)["input_ids"]]
    batch = Batch.from_ids([ids], model.tokenizer.pad_token_id, model.device)
    embed = run(model, batch, read=[Site("embed")], stop=True, remote=remote)[Site("embed")]
    return float(embed.float().std())


def target_ids(model: KVModel, target: str | int | Sequence[int]) -> list[int]:
    """Token ids of ``target``: a string (a leading space is added, as ROME does), an id or ids."""
    if isinstance(target, bool):
        raise TypeError("target must be a string, a token id or a list of token ids")
    if isinstance(target, int):
        ids = [target]
    elif isinstance(target, str):
        ids = continuation_ids(model, target)
    else:
        ids = [int(i) for i in target]
        if not ids:
            raise ValueError("empty target: the list of target token ids is empty")
    bad = [i for i in ids if not 0 <= i < model.vocab_size]
    if bad:
        raise ValueError(f"target token ids {bad} are outside the vocabulary (0..{model.vocab_size - 1})")
    return ids


@dataclass
class Setup:
    """Everything shared by the cells of one trace."""

    prompt: str
    subject: str
    span: SubjectSpan
    ids: torch.Tensor  # [1, n_prompt + m - 1]: the prompt, then the target without its last token
    n_prompt: int
    target: list[int]
    noise: torch.Tensor  # [samples, span length, d_model]
    noise_std: float
    clean: Record  # the clean run (one row)
    corrupt: Record  # the corrupted runs (one row per sample)
    high: float  # clean p(target)
    low: float  # corrupted p(target), mean over samples

    @property
    def positions(self) -> list[int]:
        """Positions whose next-token distributions score the target (teacher forcing)."""
        return list(range(self.n_prompt - 1, self.n_prompt - 1 + len(self.target)))

    @property
    def samples(self) -> int:
        return int(self.noise.shape[0])

    def batch(self, rows: int) -> Batch:
        """``rows`` copies of the traced sequence (``samples`` rows: the batch of the corrupted runs)."""
        return repeated(self.ids, self.prompt, rows)


def repeated(ids: torch.Tensor, prompt: str, rows: int) -> Batch:
    """``rows`` copies of the one sequence ``ids`` ``[1, T]`` (of text ``prompt``) as a batch."""
    return Batch(ids.repeat(rows, 1), torch.ones_like(ids).repeat(rows, 1), (prompt,) * rows)


def check_head(model: KVModel, run: Record) -> None:
    """Warn if the model's logits are not final norm + unembedding (e.g. Gemma 2's soft-capping).

    Traces score ``p(target)`` from the unembedding output in every mode (it is what the nnsight
    ``logits`` site reads), so such a model is traced on its logits before that post-processing.
    """
    mine = run.head[:, -1:]
    theirs = run.logits[:, -1:]
    if not torch.allclose(mine, theirs, rtol=1e-5, atol=1e-5 * float(theirs.abs().max())):
        warnings.warn(
            f"{model.spec.model_type} post-processes its logits after the unembedding (scaling or soft-capping); "
            "trace probabilities are computed from the unembedding output, before that step", stacklevel=4)


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax in at least float32 (float64 stays float64)."""
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def target_prob(lp: torch.Tensor, target: Sequence[int]) -> torch.Tensor:
    """``Π_k p(y_k)`` from log-probabilities ``lp`` ``[R, m, vocab]`` at the scored positions: ``[R]``."""
    idx = torch.tensor(list(target), device=lp.device)
    return lp.gather(-1, idx.expand(lp.shape[0], -1).unsqueeze(-1)).squeeze(-1).sum(-1).exp()


def check_args(model: KVModel, samples: int, window: int) -> None:
    """Clear errors for sample counts and windows the model cannot have."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an integer >= 1 (noise draws per cell), got {samples!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1, got {window!r}")
    if window > model.n_layers:
        raise ValueError(f"window {window} is larger than the model: {model.name} has {model.n_layers} layers")


def add_noise(start: int, end: int, noise: torch.Tensor) -> Write:
    """A write adding ``noise`` ``[R, end - start, d]`` to the token embeddings ``start:end`` (torch only)."""

    def corrupt(state: torch.Tensor) -> torch.Tensor:
        out = state.clone()
        out[:, start:end] += noise.to(state.device, state.dtype)
        return out

    return corrupt


def prepare(model: KVModel, prompt: str, subject: str, target: str | int | Sequence[int] | None, *,
            noise: float | None, samples: int, seed: int, remote: Remote | None = None) -> Setup:
    """Check the inputs, draw the noise, and record the clean and corrupted runs (through the seam)."""
    span = subject_span(model, prompt, subject)  # errors: template, empty or missing subject
    ids = model.tokenize(span.prompt).input_ids
    n_prompt = ids.shape[1]

    clean = record(model, repeated(ids, span.prompt, 1), remote=remote)
    if target is None:
        tgt = [int(clean.head[0, -1].argmax())]
    else:
        tgt = target_ids(model, target)
        if len(tgt) > 1:
            extra = torch.tensor([tgt[:-1]], device=ids.device)
            ids = torch.cat([ids, extra], dim=1)
            clean = record(model, repeated(ids, span.prompt, 1), remote=remote)
    std = 3.0 * noise_scale(model, remote=remote) if noise is None else float(noise)
    if not std > 0:
        raise ValueError(f"noise must be a positive standard deviation, got {noise!r}")
    gen = torch.Generator().manual_seed(seed)
    eps = std * torch.randn(samples, span.end - span.start, model.d_model, generator=gen, dtype=torch.float64)
    eps = eps.to(model.device, model.dtype)
    noised = {Site("embed"): add_noise(span.start, span.end, eps)}
    corrupt = record(model, repeated(ids, span.prompt, samples), write=noised, remote=remote)
    positions = list(range(n_prompt - 1, n_prompt - 1 + len(tgt)))
    check_head(model, clean)
    high = float(target_prob(log_probs(clean.head[:, positions]), tgt)[0])  # p from the unembedding output,
    low = float(target_prob(log_probs(corrupt.head[:, positions]), tgt).mean())  # as every cell measures it
    if high < LOW_CLEAN_PROBABILITY:
        words = model.tokenizer.decode(tgt)
        warnings.warn(f"the clean run gives the target {words!r} probability {high:.2g}: the model does not "
                      "predict it, so the trace has little to explain (it still runs)", stacklevel=3)
    return Setup(span.prompt, subject, span, ids, n_prompt, tgt, eps, std, clean, corrupt, high, low)
