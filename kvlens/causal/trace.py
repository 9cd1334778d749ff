"""``kvlens.trace``: where does the model recall a fact? (ROME causal tracing, Meng et al. 2022 §2.1)

For every token ``t`` of the prompt and layer ``l`` the trace restores the clean state at
(l, t) inside the corrupted run and measures ``p(target)``. The *indirect effect* of the cell is
``IE(l, t) = p_restored(l, t) − p_corrupted`` (ROME §2.1; ``p_clean − p_corrupted`` is the total
effect). ``mode="exact"`` gives the numbers of ROME's one-forward-per-cell procedure
(:func:`kvlens.causal.cells.plain_scores`) while recomputing only what a cell can change;
``mode="plain"`` runs that reference procedure itself (through nnsight, so ``remote=True`` can
send it to NDIF); ``mode="approx"`` is a linear *estimate* (attribution patching).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kvlens.causal.cells import KINDS, Cell, exact_scores, plain_scores
from kvlens.causal.setup import Setup, check_args, prepare
from kvlens.models.kvmodel import KVModel
from kvlens.tracing import Remote

MODES = ("exact", "plain", "approx")


@dataclass
class CausalTrace:
    """The result of :func:`trace`: restored probabilities per kind, and everything that made them.

    Attributes:
        scores: kind -> ``[tokens, layers]`` ``p(target)`` with that cell restored (mean over samples).
        high: clean ``p(target)``; low: corrupted ``p(target)`` (mean over samples).
        tokens: the prompt's tokens (the model prefix included); subject: ``(start, end)`` span.
        target: the target's text and ``target_ids``; estimate: True for ``mode="approx"``.
        params: every parameter used (mode, window, noise std, samples, seed, model name...).
    """

    prompt: str
    subject: str
    tokens: list[str]
    subject_range: tuple[int, int]
    target: str
    target_ids: list[int]
    kinds: tuple[str, ...]
    scores: dict[str, torch.Tensor]
    high: float
    low: float
    estimate: bool = False
    params: dict[str, Any] = field(default_factory=dict)

    def effect(self, kind: str | None = None) -> torch.Tensor:
        """Indirect effect ``[tokens, layers]`` of ``kind`` (the only kind when there is one)."""
        return self.scores[self._kind(kind)] - self.low

    @property
    def total_effect(self) -> float:
        """``p_clean − p_corrupted``: how much the corruption hurts the prediction."""
        return self.high - self.low

    @property
    def n_layers(self) -> int:
        return int(next(iter(self.scores.values())).shape[1])

    @property
    def label(self) -> str:
        """'estimate (attribution patching)' or 'exact'; figures show it."""
        return "estimate (attribution patching)" if self.estimate else "exact"

    def peak(self, kind: str | None = None) -> tuple[int, int]:
        """``(token, layer)`` of the largest effect of ``kind``."""
        eff = self.effect(kind)
        flat = int(eff.argmax())
        return flat // eff.shape[1], flat % eff.shape[1]

    def _kind(self, kind: str | None) -> str:
        if kind is None:
            if len(self.kinds) != 1:
                raise ValueError(f"this trace holds kinds {self.kinds}: name one")
            return self.kinds[0]
        if kind not in self.scores:
            raise KeyError(f"kind {kind!r} was not traced; this trace holds {self.kinds}")
        return kind

    def __repr__(self) -> str:
        return (f"CausalTrace({self.prompt!r}, subject={self.subject!r}, target={self.target!r}, "
                f"kinds={self.kinds}, p_clean={self.high:.3f}, p_corrupted={self.low:.3f}, {self.label})")


def check_kinds(kind: str | Sequence[str]) -> tuple[str, ...]:
    """``kind`` as a tuple of known kinds (``"all"`` = hidden, mlp, attn)."""
    kinds = KINDS if kind == "all" else (kind,) if isinstance(kind, str) else tuple(kind)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"unknown kind {bad or kind!r}; choose from {KINDS} or 'all'")
    return kinds


#: Modes that run through nnsight's remote protocol (the others drive local modules or gradients).
REMOTE_MODES = ("plain",)


def check_mode(mode: str, remote: Remote | None, model: KVModel | None = None) -> None:
    """Refuse an unknown mode, or one that cannot run where the model is (naming those that can)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    where = model.remote if remote is None and model is not None else remote
    local = model is None or model.local_weights
    if (where or not local) and mode not in REMOTE_MODES:
        why = f"remote={where!r}" if where or model is None else f"{model.name} has no local weights"
        raise ValueError(f"mode={mode!r} cannot run remotely ({why}): the exact fast mode drives local modules "
                         f"and the approximate mode needs local gradients; use mode={REMOTE_MODES[0]!r} "
                         f"(modes that run remotely: {REMOTE_MODES})")


def trace(model: KVModel, prompt: str, subject: str, target: str | int | Sequence[int] | None = None, *,
          kind: str | Sequence[str] = "hidden", window: int = 10, noise: float | None = None,
          samples: int = 10, seed: int = 1, mode: str = "exact", memory: int | None = None,
          per_forward: int = 32, remote: Remote | None = None, progress: bool = True) -> CausalTrace:
    """Causal trace of a fact: the indirect effect of every (token, layer) state.

    Args:
        model: the wrapped model (left unchanged).
        prompt: the prompt, or a template with one ``{}`` where ``subject`` goes.
        subject: the entity whose token embeddings are corrupted.
        target: the expected continuation (text, id or ids); ``None`` = the clean top-1 token.
            Several tokens score the probability of the whole sequence (teacher-forced product).
        kind: ``"hidden"`` (layer outputs), ``"mlp"``, ``"attn"`` (windows of module outputs),
            a list of them, or ``"all"``; all kinds share one set of noise draws.
        window: layers restored together for mlp/attn (ROME: 10, centred on the layer).
        noise: std of the Gaussian noise; ``None`` = 3σ (:func:`noise_scale`, ROME's ``s3``).
        samples: noise draws per cell (ROME: 10); seed: their seed (same seed, same trace).
        mode: ``"exact"`` (fast, identical to the plain procedure), ``"plain"`` (full forwards,
            ``per_forward`` cells per forward) or ``"approx"`` (attribution patching, an estimate).
        memory: bytes one exact-mode forward may use (default: 256 MiB on CPU, half the free
            GPU memory on CUDA); more rows per forward is faster until the device is busy.
        remote: where the forwards run (:data:`kvlens.tracing.Remote`: ``True`` = NDIF, ``"local"`` =
            nnsight's local dry run of the remote protocol, or an NDIF host URL; ``mode="plain"``
            only); ``None``: the model's own setting (``kv.load(name, remote=True)``).
        progress: show a progress bar over cells.
    """
    kinds = check_kinds(kind)
    check_args(model, samples, window if set(kinds) & {"mlp", "attn"} else 1)
    check_mode(mode, remote, model)
    setup = prepare(model, prompt, subject, target, noise=noise, samples=samples, seed=seed, remote=remote)
    if mode == "approx":
        from kvlens.causal.approx import attribution_scores

        scores = attribution_scores(model, setup, kinds, window)
    else:
        cells = [Cell(k, layer, t) for k in kinds for t in range(setup.n_prompt) for layer in range(model.n_layers)]
        flat = run_cells(model, setup, cells, window, mode=mode, memory=memory, per_forward=per_forward,
                         remote=remote, progress=progress, desc=f"trace {subject!r}")
        grid = flat.view(len(kinds), setup.n_prompt, model.n_layers)
        scores = {k: grid[i] for i, k in enumerate(kinds)}
    params = dict(mode=mode, window=window, noise_std=setup.noise_std, samples=samples, seed=seed,
                  model=model.name, noise_rule="3 x std of subject-token embeddings" if noise is None else "given")
    return result(model, setup, kinds, scores, params, estimate=mode == "approx")


def run_cells(model: KVModel, setup: Setup, cells: list[Cell], window: int, *, mode: str, memory: int | None,
              per_forward: int, remote: Remote | None, progress: bool, desc: str) -> torch.Tensor:
    """Scores of ``cells`` by the exact or the plain procedure, with a progress bar."""
    from tqdm.auto import tqdm

    with tqdm(total=len(cells), desc=desc, disable=not progress, leave=False) as bar:
        if mode == "exact":
            return exact_scores(model, setup, cells, window, memory=memory, progress=bar.update)
        out = []
        for i in range(0, len(cells), per_forward):
            chunk = cells[i:i + per_forward]
            out.append(plain_scores(model, setup, chunk, window, per_forward=per_forward, remote=remote))
            bar.update(len(chunk))
        return torch.cat(out).double().cpu()


def result(model: KVModel, setup: Setup, kinds: tuple[str, ...], scores: dict[str, torch.Tensor],
           params: dict[str, Any], *, estimate: bool) -> CausalTrace:
    """Package a trace's numbers (scores moved to CPU float64)."""
    tokens = model.token_strings(setup.ids[0, :setup.n_prompt])
    return CausalTrace(setup.prompt, setup.subject, tokens, (setup.span.start, setup.span.end),
                       model.tokenizer.decode(setup.target), list(setup.target), kinds,
                       {k: v.detach().double().cpu() for k, v in scores.items()}, setup.high, setup.low,
                       estimate, params)
