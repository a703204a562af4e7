"""σReparam (Zhai et al. 2023, "Stabilizing Transformer Training by Preventing Attention Entropy
Collapse"): a linear layer computes with ``W_hat = (gamma / sigma(W)) * W``.

Owns: ``SigmaReparamLinear`` (the layer), ``reparameterise_linears_`` (a block's ``nn.Linear``
layers swapped for it, ``model.sigma_reparam``; called by ``Block``), ``reset_`` (gamma and the singular-vector
estimates after the weights are initialised), ``begin_train_step`` (allows one power iteration per
optimizer step) and ``fold_state_dict`` (``W_hat`` written into ``weight`` for an export).

The idea: attention entropy collapse comes with fast growth of the attention logits' scale, i.e. of
the weights' spectral norms. ``W_hat`` has spectral norm ``gamma`` exactly, so the optimizer can
grow a layer's spectral norm only through that one learned scalar, not through every entry of W.
``sigma(W)`` is estimated by power iteration with the estimates of the top singular vectors kept
in the persistent buffers ``u`` [out] and ``v`` [in] (checkpoints save and restore them, so a
resumed run continues exactly): ``v = normalise(W^T u)``, ``u = normalise(W v)``, under no_grad;
then ``sigma = u^T W v`` WITH gradient through ``W`` on every forward (the paper's choice). ``gamma``
starts at ``sigma(W_init)`` as estimated at initialisation, so the initial function is exactly the
one without σReparam.

Where: the linears inside the transformer blocks (attention q, k, v, o and the MLP; a looped
model's prelude, core and coda blocks, with per-loop LoRA deltas added to the reparameterised
output by their hooks; a gated delta rule core layer's q, k, v, output-gate and output projections,
not its decay and beta gates, whose outputs are squashed into (0, 1) -- the reasons are in
``models.linear_attention.GatedDeltaNet``, which swaps its own linears). Not the embedding (a lookup: it multiplies nothing, so its spectral norm
bounds no product), nor the LM head (outside the blocks whose attention logits the method keeps
from growing; reparameterised, it could not stay tied to a plain embedding), nor the looped
``concat`` re-injection projection (outside the blocks too; it is left as it was).

When u, v move: ONE power iteration per optimizer step, in each layer's first training forward after
``begin_train_step(model)`` (``trainer.step.forward_backward`` calls it at the top of every step);
every later forward of the step -- the other accumulation micro-batches, a looped core's other R-1
iterations, the forward activation recompute re-runs in backward, the other micro-batches a pipeline
schedule runs before their backwards, evaluation -- uses the same u, v and therefore the same
``W_hat``. Updating on every training forward (as ``spectral_norm`` does) would give a recomputed
forward other weights than the forward it replaces. The update reads the weight inside forward,
where FSDP2 has all-gathered it: every rank computes the same u, v from the same full weight
(deterministic ops), so the buffers stay identical without a collective. Under tensor parallelism
the weight is a sharded DTensor and u, v are replicated DTensor buffers (``distribute_module``
replicates a sharded linear's buffers): the matrix-vector products then reduce over tp, and every tp
rank holds the one-process u, v up to summation order.

The scale multiplies the OUTPUT, through ``_ScaledLinear``, which saves only what ``nn.Linear``
saves (x, W) and the scalar: forming ``W_hat = s * W`` and calling ``F.linear`` would keep a
weight-sized ``W_hat`` per layer alive from forward to backward, which undoes FSDP2's freeing of
the gathered weights after forward. Measured (Llama, dim 256, 2 blocks, 32 tokens, one process):
the tensors saved for backward other than parameters grow from 1.239 MB to 1.272 MB (vectors and
scalars only; one block's weights are 2.36 MB).

Why not ``torch.nn.utils.parametrizations.spectral_norm``: (1) it has no learned ``gamma``
(``W / sigma`` has spectral norm 1 for ever, which is not σReparam); (2) it is a parametrization:
the parameter moves to ``parametrizations.weight.original``, which renames checkpoint and export
keys, and tensor parallelism cannot shard it (measured, torch 2.13 with gloo: ``ColwiseParallel``
raises ``KeyError: 'parameter name can't contain "."'``, ``RowwiseParallel`` raises "distribute_tensor
should be used to distribute leaf tensors"; FSDP2 alone ran a forward and backward);
(3) it updates u, v on every training forward, so a recomputed forward (and
each of a looped core's iterations) sees a different ``W / sigma`` than the first; (4) it builds
the weight-sized ``W / sigma`` saved for backward, the memory issue above.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# power iterations run on the freshly initialised weight: gamma = sigma(W_init) needs only a
# consistent estimate (the initial function is unchanged whatever it is), but the closer it is to
# the spectral norm the smaller the first steps' change of sigma
INIT_ITERATIONS = 30
_EPS = 1e-12


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm().clamp_min(_EPS)


def _placed_like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` with ``ref``'s DTensor placements (a no-op for plain tensors)."""
    if hasattr(ref, "placements") and hasattr(t, "placements") and t.placements != ref.placements:
        return t.redistribute(ref.device_mesh, ref.placements)
    return t


class _ScaledLinear(torch.autograd.Function):
    """``scale * (x @ W^T)`` saving x, W and the scalar only (see the module docstring).

    Backward: ``g_W0 = g^T x`` gives both ``grad_W = scale * g_W0`` and ``grad_scale = <g_W0, W>``
    (= ``<g, x W^T>``), so no output-sized tensor is saved either. Under autocast the forward's
    ``F.linear`` runs in the autocast dtype; backward casts x and W to the gradient's dtype, as
    autocast's own casts do.
    """

    @staticmethod
    def forward(ctx, x, weight, scale):
        y = F.linear(x, weight)
        ctx.save_for_backward(x, weight, scale)
        return y * scale.to(y.dtype)

    @staticmethod
    def backward(ctx, g):
        x, weight, scale = ctx.saved_tensors
        w = weight.to(g.dtype)
        g2 = g.reshape(-1, g.shape[-1])
        g_w0 = g2.t() @ x.reshape(-1, x.shape[-1]).to(g.dtype)
        grad_x = (g @ w) * scale.to(g.dtype)
        grad_scale = (g_w0.to(scale.dtype) * weight.to(scale.dtype)).sum().reshape(scale.shape)
        grad_w = (g_w0 * scale.to(g.dtype)).to(weight.dtype)
        return grad_x.to(x.dtype), grad_w, grad_scale


class SigmaReparamLinear(nn.Linear):
    """An ``nn.Linear`` (no bias) computing ``x @ (gamma / sigma(W) * W)^T``; parameters ``weight``
    (names unchanged) and ``gamma`` (one element), persistent buffers ``u``, ``v``.

    Built around an existing ``weight`` parameter (``nn.Linear.__init__`` is not run: it would draw
    a fresh weight from the global RNG, shifting every later initialisation of the model)."""

    def __init__(self, weight: nn.Parameter):
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.register_parameter("bias", None)
        # the estimates and gamma in float32 at least (a bf16 weight's sigma is computed upcast)
        kw = {"device": weight.device, "dtype": torch.promote_types(weight.dtype, torch.float32)}
        self.gamma = nn.Parameter(torch.ones(1, **kw))  # one element, not a scalar: FSDP2 shards along dim 0
        self.register_buffer("u", torch.zeros(self.out_features, **kw))
        self.register_buffer("v", torch.zeros(self.in_features, **kw))
        self.update_pending = False  # set by begin_train_step, cleared by the step's first training forward

    @torch.no_grad()
    def power_iteration_(self, n: int = 1) -> None:
        """``n`` power iterations on the current (gathered) weight, in u's dtype (float32 unless
        the model was cast to float64), into u and v."""
        w = self.weight.detach().to(self.u.dtype)
        u, v = self.u, self.v
        for _ in range(n):
            v = _normalise(torch.mv(w.t(), u))
            u = _normalise(torch.mv(w, v))
        self.u.copy_(_placed_like(u, self.u))
        self.v.copy_(_placed_like(v, self.v))

    def sigma(self) -> torch.Tensor:
        """``u^T W v`` in u's dtype (float32: a bf16 weight is upcast), with gradient through W
        (not through u, v)."""
        return torch.dot(self.u, torch.mv(self.weight.to(self.u.dtype), self.v))

    @torch.no_grad()
    def reset_(self) -> None:
        """After the weight is initialised: u from a fixed generator (the global RNG stream, and
        so every later initialisation, stays as without σReparam), ``INIT_ITERATIONS`` power
        iterations, gamma = the estimate."""
        if self.weight.is_meta:
            return
        g = torch.Generator().manual_seed(0)
        self.u.copy_(_normalise(torch.randn(self.out_features, generator=g)).to(self.u.device))
        self.power_iteration_(INIT_ITERATIONS)
        self.gamma.copy_(self.sigma())
        self.update_pending = False

    def scale(self) -> torch.Tensor:
        """``gamma / sigma`` in u's dtype, after this step's power iteration if it is still due."""
        with torch.autocast(self.weight.device.type, enabled=False):
            if self.training and self.update_pending:
                self.update_pending = False
                self.power_iteration_()
            return self.gamma.to(self.u.dtype) / self.sigma()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ScaledLinear.apply(x, self.weight, self.scale())

    def extra_repr(self) -> str:
        return super().extra_repr() + ", sigma_reparam=True"


def reparameterise_linears_(module: nn.Module) -> None:
    """Swap every bias-free ``nn.Linear`` under ``module`` (a transformer block: attention q, k, v,
    o and the MLP) for a ``SigmaReparamLinear`` of the same shape, on the same device; call before
    initialising the weights (``reset_`` then follows the initialisation)."""
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            if child.bias is not None:
                raise ValueError(f"sigma_reparam: {name} has a bias; only bias-free linears are reparameterised.")
            setattr(module, name, SigmaReparamLinear(child.weight))
        else:
            reparameterise_linears_(child)


def reset_(module: nn.Module) -> None:
    """``reset_`` every σReparam layer under ``module`` (after its weights were initialised)."""
    for m in module.modules():
        if isinstance(m, SigmaReparamLinear):
            m.reset_()


def begin_train_step(model: nn.Module) -> None:
    """Allow each σReparam layer of ``model`` one power iteration, in its next training forward.
    Call once per optimizer step, before its forwards; a no-op for a model without σReparam."""
    for m in model.modules():
        if isinstance(m, SigmaReparamLinear):
            m.update_pending = True


def fold_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full state dict with every σReparam layer's ``W_hat = gamma / (u^T W v) * W`` written into
    its ``weight`` and ``gamma``, ``u``, ``v`` dropped: the plain linear computing what the layer
    computes in evaluation (u, v as saved). Float32 arithmetic; the weight keeps its dtype."""
    out = dict(state)
    for key in [k for k in state if k.endswith(".gamma")]:
        prefix = key[: -len("gamma")]
        w = state[prefix + "weight"]
        u, v = out.pop(prefix + "u").float(), out.pop(prefix + "v").float()
        sigma = torch.dot(u, torch.mv(w.float(), v))
        out[prefix + "weight"] = (out.pop(key).float() / sigma * w.float()).to(w.dtype)
    return out
