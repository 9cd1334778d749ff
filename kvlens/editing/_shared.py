"""The core every editing method shares, written once.

* prefix contexts x_j (seeded, recorded in the delta; ROME/MEMIT sampled them unseeded);
* rows: each request's prompt in every context, teacher-forced with its target tokens, plus the
  "{subject} is a" prompt of the essence KL term, with the subject's last token located by
  :func:`kvlens.prompts.subject_span`;
* states at the subject's last token averaged over contexts (the key k* of ROME, Eq. 19 of MEMIT);
* per-request losses (length-normalized NLL of the target + KL + decay);
* target-vector optimisation (ROME compute_v / MEMIT compute_z, Eq. 16) for many requests at once;
* the before/after probability of every target on its own prompt;
* a progress hook: :func:`on_progress` makes the optimisation loops report each step
  (:class:`EditProgress`) to a callable, which may raise to stop the computation.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch

from kvlens import tracing
from kvlens.editing.hparams import Contexts
from kvlens.editing.request import EditRequest
from kvlens.models.kvmodel import Batch, KVModel, Site
from kvlens.prompts import check_length, continuation_ids, subject_span


@dataclass(frozen=True)
class EditProgress:
    """One optimisation step of an edit: ``stage`` (``"target vectors"`` / ``"fine-tuning"``), step
    ``step`` of at most ``total``, the summed loss, and how many requests are still optimising."""

    stage: str
    step: int
    total: int
    loss: float
    active: int


_PROGRESS: ContextVar[Callable[[EditProgress], None] | None] = ContextVar("kvlens_edit_progress", default=None)


@contextlib.contextmanager
def on_progress(callback: Callable[[EditProgress], None] | None) -> Iterator[None]:
    """Within the block, the editing loops call ``callback(EditProgress)`` after each step (None: keep
    the current one). An exception it raises (e.g. a ``KeyboardInterrupt`` subclass for *Cancel*)
    stops the computation; every method restores the model bitwise on the way out."""
    if callback is None:
        yield
        return
    token = _PROGRESS.set(callback)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


def report_step(stage: str, step: int, total: int, loss: float, active: int) -> None:
    """Tell the :func:`on_progress` callback, if any, that ``step`` of ``total`` is done."""
    callback = _PROGRESS.get()
    if callback is not None:
        callback(EditProgress(stage, step, total, loss, active))


_STARTERS = ("The", "Therefore", "Because", "I", "You")  # MEMIT's generation seeds
KL_PROMPT = "{} is a"  # ROME's essence prompt


def context_templates(model: KVModel, contexts: Contexts) -> tuple[str, ...]:
    """``("{}", "x_1. {}", ...)``: ``contexts.n`` prefixes sampled top-5 from the model, seeded.

    Each prefix grows one token per forward through the seam (a few short prompts: no cache needed).
    """
    gen = torch.Generator().manual_seed(contexts.seed)
    out = ["{}"]
    last = Site("logits")
    for j in range(contexts.n):
        ids = model.tokenize(_STARTERS[j % len(_STARTERS)]).input_ids
        with torch.no_grad():
            for _ in range(contexts.tokens):
                batch = Batch(ids, torch.ones_like(ids), ("",))
                logits = tracing.run(model, batch, read=[last])[last]
                top = torch.topk(logits[0, -1].float().cpu(), 5)
                pick = top.indices[torch.multinomial(torch.softmax(top.values, -1), 1, generator=gen)]
                ids = torch.cat([ids, pick.view(1, 1).to(ids.device)], 1)
        start = ids.shape[1] - contexts.tokens - 1  # the starter's last token, then the sampled ones
        text = model.tokenizer.decode(ids[0, start:].tolist())
        text = " ".join(text.replace("{", " ").replace("}", " ").split()) or _STARTERS[0]
        out.append(text + ". {}")
    return tuple(out)


def target_ids(model: KVModel, request: EditRequest) -> list[int]:
    """Token ids of the request's new target (with its leading space, as ROME does)."""
    return continuation_ids(model, request.target_new)


@dataclass(frozen=True)
class Rows:
    """Prompts of a set of requests in one right-padded batch, with the positions methods need.

    ``request[r]`` / ``subject[r]`` / ``context[r]``: the request, subject-last column and
    context index of row r (context -1 = the KL prompt). ``tgt_*``: one entry per teacher-forced
    target token (row, column predicting it, its id, weight so that each request's weights sum to
    1 over its rewrite rows).
    """

    batch: Batch
    request: torch.Tensor
    subject: torch.Tensor
    context: torch.Tensor
    tgt_row: torch.Tensor
    tgt_col: torch.Tensor
    tgt_id: torch.Tensor
    tgt_weight: torch.Tensor
    n_requests: int

    @property
    def kl_rows(self) -> torch.Tensor:
        return (self.context < 0).nonzero().flatten()

    def rows_of(self, requests: Sequence[int] | torch.Tensor, *, clean: bool = False) -> torch.Tensor:
        """Indices of the rows of ``requests`` in batch order (only their clean prompts if ``clean``)."""
        keep = torch.zeros(self.n_requests, dtype=torch.bool)
        keep[torch.as_tensor(requests, dtype=torch.long)] = True
        keep = keep[self.request]
        if clean:
            keep &= self.context == 0
        return keep.nonzero().flatten()

    def select(self, requests: Sequence[int] | torch.Tensor, *, clean: bool = False) -> Rows:
        """The rows of ``requests`` (renumbered 0..), optionally only their clean prompts."""
        req = torch.as_tensor(requests, dtype=torch.long)
        remap = torch.full((self.n_requests,), -1, dtype=torch.long)
        remap[req] = torch.arange(len(req))
        rows = self.rows_of(req, clean=clean)
        new_row = torch.full((len(self.request),), -1, dtype=torch.long)
        new_row[rows] = torch.arange(len(rows))
        t = (new_row[self.tgt_row] >= 0).nonzero().flatten()
        width = int(self.batch.attention_mask[rows].sum(-1).max())
        dev = self.batch.input_ids.device
        batch = Batch(self.batch.input_ids[rows.to(dev), :width], self.batch.attention_mask[rows.to(dev), :width],
                      tuple(self.batch.prompts[i] for i in rows.tolist()))
        return Rows(batch, remap[self.request[rows]], self.subject[rows], self.context[rows],
                    new_row[self.tgt_row[t]], self.tgt_col[t], self.tgt_id[t], self.tgt_weight[t], len(req))


def build_rows(model: KVModel, requests: Sequence[EditRequest], templates: Sequence[str], *,
               kl: bool = True) -> Rows:
    """Rows for every (request, context) teacher-forced with the target, plus KL rows if ``kl``."""
    ids: list[list[int]] = []
    meta: list[tuple[int, int, int]] = []
    tgt: list[tuple[int, int, int, float]] = []
    for i, req in enumerate(requests):
        target = target_ids(model, req)
        for j, ctx in enumerate(templates):
            template = ctx.replace("{}", req.prompt)
            span = subject_span(model, template, req.subject)
            prompt_ids = model.tokenize(span.prompt).input_ids[0].tolist()
            check_length(model, len(prompt_ids) + len(target) - 1, f"request {i} ({req.text!r} -> {req.target_new!r})"
                         + (f" with context prefix {ctx.replace('{}', '')!r}" if j else ""))
            for k, tok in enumerate(target):
                tgt.append((len(ids), len(prompt_ids) - 1 + k, tok, 1.0 / (len(target) * len(templates))))
            meta.append((i, span.last, j))
            ids.append(prompt_ids + target[:-1])
        if kl:
            span = subject_span(model, KL_PROMPT, req.subject)
            meta.append((i, span.last, -1))
            ids.append(model.tokenize(span.prompt).input_ids[0].tolist())
    base = Batch.from_ids(ids, model.tokenizer.pad_token_id, model.device)
    m = torch.tensor(meta, dtype=torch.long)
    t = torch.tensor([x[:3] for x in tgt], dtype=torch.long)
    return Rows(base, m[:, 0], m[:, 1], m[:, 2], t[:, 0], t[:, 1], t[:, 2],
                torch.tensor([x[3] for x in tgt]), len(requests))


def subject_states(model: KVModel, rows: Rows, sites: Sequence[Site], *, chunk: int = 32,
                   grouped: bool = False, write: Mapping[Site, tracing.Write] | None = None,
                   ) -> dict[Site, torch.Tensor]:
    """States at each row's subject-last token, averaged per request over its non-KL rows: ``[N, ...]``.

    ``grouped``: average the clean prompt and the prefixes as two groups, then the groups (the
    released MEMIT ``compute_ks``; :class:`~kvlens.editing.hparams.MEMITHparams` ``key_average``).
    ``write``: trace writes for the forward (one chunk only: the caller sizes it). Runs ``chunk``
    requests per forward (memory stays bounded for thousands of requests).
    """
    if rows.n_requests > chunk and write is None:
        parts = [subject_states(model, rows.select(range(lo, min(lo + chunk, rows.n_requests))), sites,
                                grouped=grouped) for lo in range(0, rows.n_requests, chunk)]
        return {s: torch.cat([p[s] for p in parts]) for s in sites}
    keep = (rows.context >= 0).nonzero().flatten()
    top = max(s.layer for s in sites)
    states = tracing.run(model, rows.batch, read=sites, write=write, stop=top < model.n_layers - 1)
    counts = torch.bincount(rows.request[keep], minlength=rows.n_requests).float()
    weight = _group_weights(rows.request[keep], rows.context[keep], rows.n_requests) if grouped else None
    out = {}
    for site, s in states.items():
        picked = s[keep.to(s.device), rows.subject[keep].to(s.device)].float().cpu()
        shape = (-1, *([1] * (picked.dim() - 1)))
        if weight is not None:  # Σ w·k with the weights of each request summing to 1
            picked = picked * weight.view(shape)
        total = torch.zeros(rows.n_requests, *picked.shape[1:]).index_add_(0, rows.request[keep], picked)
        out[site] = total if weight is not None else total / counts.view(shape)
    return out


def _group_weights(request: torch.Tensor, context: torch.Tensor, n: int) -> torch.Tensor:
    """Each row's weight in its request's grouped mean: ½ the clean prompt, ½ shared by the prefixes."""
    prefixes = torch.bincount(request[context > 0], minlength=n).float()
    clean = torch.where(prefixes > 0, 0.5, 1.0)  # no prefixes: the clean group is the only one
    return torch.where(context == 0, clean[request], 0.5 / prefixes.clamp_min(1)[request])


def decode_at(model: KVModel, final: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Log-probabilities over the vocabulary from the last layer's states at (rows, cols)."""
    h = final[rows.to(final.device), cols.to(final.device)]
    return torch.log_softmax(tracing.logits_of(model, h).float(), -1)


def request_losses(rows: Rows, tgt_logp: torch.Tensor, kl_logp: torch.Tensor | None,
                   kl_init: torch.Tensor | None, kl_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-request (NLL, KL): length-normalized target NLL averaged over contexts; KL(now ‖ init).

    The essence term of ROME Eq. 4 (rome/compute_v.py: ``kl_div(init, now, log_target=True)``).
    """
    nll = torch.zeros(rows.n_requests, device=tgt_logp.device).index_add(
        0, rows.request[rows.tgt_row].to(tgt_logp.device), -tgt_logp * rows.tgt_weight.to(tgt_logp.device))
    kl = torch.zeros_like(nll)
    if kl_logp is not None and kl_init is not None and kl_factor > 0:
        per = torch.nn.functional.kl_div(kl_init, kl_logp, log_target=True, reduction="none").sum(-1)
        kl = kl.index_add(0, rows.request[rows.kl_rows].to(per.device), kl_factor * per)
    return nll, kl


def forward_logprobs(model: KVModel, rows: Rows, delta: torch.Tensor | None, *, layer: int,
                     prefix: tracing.Prefix | None = None, extra: Mapping[Site, tracing.Write] | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Target-token and KL-row log-probabilities with ``delta[r]`` added after ``layer`` at row r's subject.

    With ``prefix`` (:func:`tracing.prefix_run` of ``rows`` from their subject tokens) only layers
    above ``layer`` at positions from the subject on are computed; otherwise the whole model runs,
    with the ``extra`` trace writes too (e.g. per-row weight changes). Only the positions the
    losses need are decoded.
    """
    if extra and prefix is not None:
        raise ValueError("extra writes need the whole forward: pass prefix=None with them")
    final = Site("resid", model.n_layers - 1)
    n_rows = torch.arange(len(rows.request))
    kl_rows = rows.kl_rows
    if prefix is not None:
        shift = prefix.start  # suffix layout: column i of row r is position start[r] + i
        write = tracing.add_at(n_rows, rows.subject - shift, delta) if delta is not None else (lambda s: s)
        states = tracing.run_skipping(model, prefix, top=write, read=[final], grad=True, stop=True)
    else:
        write = tracing.add_at(n_rows, rows.subject, delta) if delta is not None else (lambda s: s)
        writes = {**(extra or {}), Site("resid", layer): write}
        states = tracing.run(model, rows.batch, write=writes, read=[final], grad=True)
        shift = torch.zeros_like(rows.subject)
    cols = torch.cat([rows.tgt_col - shift[rows.tgt_row], rows.subject[kl_rows] - shift[kl_rows]])
    logp = decode_at(model, states[final], torch.cat([rows.tgt_row, kl_rows]), cols)
    n = len(rows.tgt_row)
    return logp[:n].gather(1, rows.tgt_id.view(-1, 1).to(logp.device)).squeeze(1), logp[n:]


@dataclass
class _Adam:
    """Adam on rows of one tensor, stepping only the active rows (so batched = one by one)."""

    lr: float
    m: torch.Tensor
    v: torch.Tensor
    t: int = 0

    def step(self, x: torch.Tensor, grad: torch.Tensor, active: torch.Tensor) -> None:
        b1, b2, eps = 0.9, 0.999, 1e-8
        self.t += 1
        self.m[active] = b1 * self.m[active] + (1 - b1) * grad[active]
        self.v[active] = b2 * self.v[active] + (1 - b2) * grad[active] ** 2
        m_hat, v_hat = self.m[active] / (1 - b1 ** self.t), self.v[active] / (1 - b2 ** self.t)
        x[active] -= self.lr * m_hat / (v_hat.sqrt() + eps)


def optimise_targets(model: KVModel, rows: Rows, layer: int, reference: torch.Tensor, opt: Any, *,
                     skip_fixed: bool = True) -> tuple[torch.Tensor, dict[str, Any]]:
    """δ_i added to the residual after ``layer`` at each request's subject-last token (Eq. 16).

    Loss per request: NLL(target) + KL + ``wd · ‖δ‖/‖ref‖²``; the total is a *sum* over requests
    and Adam runs per row, so optimising many requests together gives the same δ as one by one.
    A request stops once its loss is below ``opt.early_stop``; ‖δ_i‖ is clamped to
    ``opt.clamp · ‖reference_i‖`` (ROME: MLP output, MEMIT: h^L, App. B). Returns δ ``[N, d_model]``
    and a log: each request's final loss and steps, its clamp bound ``max_norm``, and ``curves``,
    per request the value at every step it took part in of ``nll``, ``kl``, ``decay`` (the
    norm penalty) and ``norm`` (‖δ‖ entering that step).
    """
    n, dev = rows.n_requests, model.device
    delta = torch.zeros(n, model.d_model, device=dev)
    adam = _Adam(opt.lr, torch.zeros_like(delta), torch.zeros_like(delta))
    active = torch.ones(n, dtype=torch.bool, device=dev)
    ref = reference.to(dev).float().norm(dim=-1)
    loss_last = torch.full((n,), float("nan"))
    steps = torch.zeros(n, dtype=torch.long)
    curves: dict[str, list[list[float]]] = {k: [[] for _ in range(n)] for k in ("nll", "kl", "decay", "norm")}
    kl_init: torch.Tensor | None = None
    prefix = tracing.prefix_run(model, rows.batch, layer, rows.subject) if skip_fixed else None
    sub, sub_prefix, sub_idx = rows, prefix, torch.arange(n)
    for step in range(opt.steps):
        leaf = delta[sub_idx.to(dev)].clone().requires_grad_(True)
        tgt_logp, kl_logp = forward_logprobs(model, sub, leaf[sub.request.to(dev)], layer=layer, prefix=sub_prefix)
        if kl_init is None:
            kl_init = kl_logp.detach()
        kl_ref = kl_init[_kl_index(rows, sub_idx[sub.request[sub.kl_rows]])]  # in sub's KL-row order
        nll, kl = request_losses(sub, tgt_logp, kl_logp, kl_ref, opt.kl_factor)
        decay = opt.weight_decay * leaf.norm(dim=-1) / ref[sub_idx.to(dev)] ** 2
        loss = nll + kl + decay
        loss_last[sub_idx] = loss.detach().cpu()
        for name, value in (("nll", nll), ("kl", kl), ("decay", decay), ("norm", leaf.norm(dim=-1))):
            for i, v in zip(sub_idx.tolist(), value.detach().cpu().tolist()):
                curves[name][i].append(v)
        done = loss.detach().cpu() < opt.early_stop
        report_step("target vectors", step + 1, opt.steps, float(loss.detach().sum()),
                    int((~done).sum()))
        if bool(done.all()) or (not opt.final_update and step == opt.steps - 1):
            break  # the released code's loop stops here before its last update (TargetOpt.final_update)
        (grad,) = torch.autograd.grad(loss[~done.to(loss.device)].sum(), leaf)
        full_grad = torch.zeros_like(delta)
        full_grad[sub_idx.to(dev)] = grad
        active[sub_idx[done].to(dev)] = False
        steps[sub_idx[~done]] += 1
        adam.step(delta, full_grad, active)
        _clamp_(delta, ref * opt.clamp)
        if bool(done.any()):
            sub_idx = active.nonzero().flatten().cpu()
            sub = rows.select(sub_idx)
            sub_prefix = prefix.select(rows.rows_of(sub_idx)) if prefix is not None else None
    return delta.detach(), {"loss": loss_last.tolist(), "steps": steps.tolist(),
                            "max_norm": (ref * opt.clamp).cpu().tolist(), "curves": curves}


def request_log(log: Mapping[str, Any], i: int) -> dict[str, Any]:
    """Request ``i``'s part of an :func:`optimise_targets` log, shaped as the log of it alone."""
    out: dict[str, Any] = {k: [v[i]] if isinstance(v, list) else v for k, v in log.items() if k != "curves"}
    out["curves"] = {k: [v[i]] for k, v in log["curves"].items()}
    return out


def _kl_index(rows: Rows, requests: torch.Tensor) -> torch.Tensor:
    """Positions, in ``rows.kl_rows`` order, of the KL rows of ``requests``."""
    order = rows.request[rows.kl_rows]
    pos = torch.full((rows.n_requests,), -1, dtype=torch.long)
    pos[order] = torch.arange(len(order))
    return pos[requests]


def _clamp_(delta: torch.Tensor, max_norm: torch.Tensor) -> None:
    norm = delta.norm(dim=-1)
    scale = torch.where(norm > max_norm, max_norm / norm.clamp_min(1e-12), torch.ones_like(norm))
    delta.mul_(scale.unsqueeze(-1))


def target_report(model: KVModel, requests: Sequence[EditRequest]) -> list[dict[str, Any]]:
    """For each request on its own prompt: p(target) (geometric mean over tokens) and the top-1 token."""
    rows = build_rows(model, requests, ("{}",), kl=False)
    final = Site("resid", model.n_layers - 1)
    with torch.no_grad():
        states = tracing.run(model, rows.batch, read=[final])
        logp = decode_at(model, states[final], rows.tgt_row, rows.tgt_col)
    tok = logp.gather(1, rows.tgt_id.view(-1, 1).to(logp.device)).squeeze(1).cpu()
    mean = torch.zeros(len(requests)).index_add_(0, rows.request[rows.tgt_row], tok * rows.tgt_weight)
    out = []
    for i, req in enumerate(requests):
        first = int((rows.request[rows.tgt_row] == i).nonzero()[0])
        top = int(logp[first].argmax())
        out.append({"prompt": req.text, "target": req.target_new, "p_target": float(mean[i].exp()),
                    "top1": model.tokenizer.decode([top]), "target_is_top1": top == int(rows.tgt_id[first])})
    return out


def outcome(model: KVModel, requests: Sequence[EditRequest], before: list[dict[str, Any]],
            delta: Any) -> dict[str, Any]:
    """Target probabilities before/after ``delta`` (applied, measured, reverted); warns if it did not take."""
    with delta.applied(model):
        after = target_report(model, requests)
    rows = [{**a, "p_before": b["p_target"], "p_after": a["p_target"]} for a, b in zip(after, before)]
    failed = [r["prompt"] + " ->" + r["target"] for r in rows if not r["target_is_top1"]]
    if failed:
        warnings.warn(f"{delta.method}: the edit did not reach its goal for {len(failed)}/{len(rows)} "
                      f"request(s) (target not top-1 after the edit): {failed[:5]}", stacklevel=3)
    return {"requests": rows, "reached": not failed,
            "efficacy": sum(r["target_is_top1"] for r in rows) / len(rows)}
