"""Layer read-outs: what each layer's FFN writes and what the residual says, at two positions.

Used to show where an edit acts: a value edit at layer l leaves the key activations at l unchanged
(they are the *input* of V) but changes the FFN output of layer l, and through the residual every
layer above it. :func:`layer_readout` reads, in one forward, the FFN output and the residual after
every layer at the subject's last token and at the prompt's last token, and the probability the
residual after each layer gives the target's first token (logit lens: final norm + unembedding,
nostalgebraist 2020); comparing a read-out taken before an edit with one taken after it shows
which layers the edit changed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlens import tracing
from kvlens.memory.vocab import to_vocab
from kvlens.models.kvmodel import KVModel, Site
from kvlens.prompts import continuation_ids, subject_span


@dataclass(frozen=True)
class LayerReadout:
    """Per layer: FFN output and residual ``[n_layers, 2, d_model]`` at (subject-last, last) token;
    ``p_target[l]``: the probability the residual after layer ``l`` gives the target's first token
    at the last position (``target_token`` names it)."""

    prompt: str
    subject: str
    target: str
    target_token: str
    positions: tuple[int, int]
    mlp: torch.Tensor
    resid: torch.Tensor
    p_target: torch.Tensor

    def change(self, after: LayerReadout) -> dict[str, list[float]]:
        """‖after − before‖ per layer of the FFN output and residual at both positions."""
        if (self.prompt, self.positions) != (after.prompt, after.positions):
            raise ValueError("the read-outs were taken on different prompts; read the same prompt after the edit")
        return {"mlp_subject": (after.mlp[:, 0] - self.mlp[:, 0]).norm(dim=-1).tolist(),
                "mlp_last": (after.mlp[:, 1] - self.mlp[:, 1]).norm(dim=-1).tolist(),
                "resid_subject": (after.resid[:, 0] - self.resid[:, 0]).norm(dim=-1).tolist(),
                "resid_last": (after.resid[:, 1] - self.resid[:, 1]).norm(dim=-1).tolist()}


def layer_readout(model: KVModel, prompt: str, subject: str, target: str) -> LayerReadout:
    """Read every layer's FFN output and residual of ``prompt`` (a template or filled prompt)."""
    span = subject_span(model, prompt, subject)
    target_id = continuation_ids(model, target)[0]
    batch = model.tokenize(span.prompt)
    last = int(batch.lengths[0]) - 1
    layers = range(model.n_layers)
    sites = [*(Site("mlp", l) for l in layers), *(Site("resid", l) for l in layers)]
    with torch.no_grad():
        states = tracing.run(model, batch, read=sites)
        at = torch.tensor([span.last, last])
        mlp = torch.stack([states[Site("mlp", l)][0, at.to(states[Site("mlp", l)].device)].float().cpu()
                           for l in layers])
        resid = torch.stack([states[Site("resid", l)][0, at.to(states[Site("resid", l)].device)].float().cpu()
                             for l in layers])
        probs = torch.softmax(to_vocab(model, resid[:, 1], "final").float(), -1)[:, target_id]
    return LayerReadout(span.prompt, subject, target, model.token_strings([target_id])[0], (span.last, last),
                        mlp, resid, probs.cpu())
