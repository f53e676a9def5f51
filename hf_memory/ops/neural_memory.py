"""Titans' neural long-term memory (Behrouz, Zhong & Mirrokni, "Titans: Learning to Memorize at Test Time",
arXiv 2501.00663, section 3.1-3.2): an MLP whose weights are the state, learned at test time by gradient
descent with momentum and forgetting on the associative loss of each token.

Per head, with keys k_t, values v_t, queries q_t [d] and data-dependent gates theta_t (step), eta_t (momentum),
alpha_t (forgetting) in (0, 1):

    loss      l(M; k_t, v_t) = 1/2 || M(k_t) - v_t ||^2                                  (eq. 12; App. C's 1/2)
    surprise  S_t = eta_t S_{t-1} - theta_t grad l(M_{t'}; k_t, v_t)                      (eq. 13 / 18)
    memory    M_t = (1 - alpha_t) M_{t-1} + S_t                                           (eq. 14)
    retrieval y_t = M_{c(t)}(q_t)  (no update)                                            (eq. 15)

M(x) = W_L phi(... phi(W_1 x)) with ``depth`` L >= 1 (phi = SiLU; L = 1 is the linear memory). Training is
chunked (section 3.2): inside a chunk of ``chunk_size`` tokens every gradient is taken at the weights M_{t'} of
the chunk start, and momentum and decay run over the chunk's tokens; chunk size 1 is the exact sequential
rule. A token reads the weights committed by the last completed chunk, its own chunk included when it closes
it (c(t): the tokens up to and including t, rounded down to whole chunks), so chunk size 1 reads M_t(q_t),
and a cache that holds the unfinished chunk decodes exactly like the full forward.

Each token's gradient is clipped to norm ``max_grad_norm`` (the published implementations diverge to NaN on
deep memories and long inputs without it). Weights, momentum, gradients and gates are fp32 whatever the
inputs' dtype.

Implementations:
  * ``neural_memory_reference``: the definition, token by token, materialising every gradient;
  * ``neural_memory_chunked``: the same function with each token's gradient kept factored (a rank-1 outer
    product per layer), momentum and decay folded into one coefficient per token from log-space cumulative
    products, and one matmul per layer per chunk for the commit (``chunk_step``);
  * ``neural_memory``: dispatch between ``neural_memory_chunked`` and the fused Triton kernel on CUDA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hf_memory.kernels import fused_kernel

# what the Triton kernel covers: head sizes up to 128 (padded to 16 / 32 / 64 / 128), chunks of 16 to 64 tokens
FUSED_MAX_HEAD_SIZE = 128
FUSED_CHUNK_SIZES = (16, 32, 64)


def fused_precision() -> str:
    """The Triton kernel's matmul precision, following ``torch.get_float32_matmul_precision()`` as PyTorch's own
    fp32 matmuls do: "highest" (PyTorch's default) -> "tf32x3" (three TF32 tensor-core products per product,
    fp32-level accuracy), "high" or "medium" -> "tf32" (one, 10 mantissa bits, like fla's kernels)."""
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def fused_fits(head_size: int, hidden_size: int, depth: int, chunk_size: int) -> bool:
    """Whether the Triton kernel covers this memory: depth 1 or 2, head size 16 to 128, hidden size >= 16, chunks
    of 16 / 32 / 64, and at depth 2 in "tf32x3" a chunk of at most 4096 padded entries (chunk x padded head size):
    its operands' split copies would overflow a Hopper SM's 227 KiB of shared memory (a test compiles the largest
    covered cases for sm_90)."""
    padded = 1 << (head_size - 1).bit_length()
    return (depth in (1, 2) and 16 <= head_size <= FUSED_MAX_HEAD_SIZE and hidden_size >= 16
            and chunk_size in FUSED_CHUNK_SIZES
            and (depth == 1 or fused_precision() == "tf32" or chunk_size * padded <= 4096))


def mlp_forward(weights: list[torch.Tensor], x: torch.Tensor):
    """M(x) for weights [..., d_in, d_out] (one set per batch row and head) and x [..., n, d]; returns the output
    and the pre-activations z_l and inputs a_{l-1} of every layer (for the gradient)."""
    inputs, pre = [], []
    hidden = x
    for i, w in enumerate(weights):
        inputs.append(hidden)
        z = hidden @ w
        if i + 1 < len(weights):
            pre.append(z)
            hidden = F.silu(z)
        else:
            hidden = z
    return hidden, inputs, pre


def token_gradients(weights, k, v):
    """Factored per-token gradients of 1/2 ||M(k) - v||^2 at ``weights``: per layer l, (a_{l-1}, delta_l) with
    grad W_l = a_{l-1}^T delta_l for each token (k, v [..., n, d]; a, delta [..., n, d_in / d_out])."""
    out, inputs, pre = mlp_forward(weights, k)
    delta = out - v
    factors = [None] * len(weights)
    for layer in range(len(weights) - 1, -1, -1):
        factors[layer] = (inputs[layer], delta)
        if layer:
            z = pre[layer - 1]
            sig = torch.sigmoid(z)
            delta = (delta @ weights[layer].transpose(-1, -2)) * (sig * (1 + z * (1 - sig)))  # SiLU'
    return factors


def clip_scale(factors, max_grad_norm: float | None) -> torch.Tensor | None:
    """Per token, min(1, max_grad_norm / ||grad||) over all layers' rank-1 gradients (||a d^T|| = |a| |d|)."""
    if max_grad_norm is None:
        return None
    squared = sum(a.square().sum(-1) * d.square().sum(-1) for a, d in factors)
    return (max_grad_norm / squared.clamp(min=1e-24).sqrt()).clamp(max=1.0)  # no infinite d sqrt at 0


def _in_fp32(q, k, v, theta, eta, alpha, weights, momentum, chunk_size: int):
    """Every input in fp32 (alpha below 1, momentum zeros when not given); the length a whole number of chunks."""
    if q.shape[2] % chunk_size:
        raise ValueError(f"whole chunks only: {q.shape[2]} tokens, chunks of {chunk_size} (keep the rest as pending)")
    weights = [w.float() for w in weights]
    momentum = [torch.zeros_like(w) for w in weights] if momentum is None else [s.float() for s in momentum]
    return (q.float(), k.float(), v.float(), theta.float(), eta.float(), alpha.float().clamp(max=1 - 1e-6),
            weights, momentum)


def neural_memory_reference(q, k, v, theta, eta, alpha, weights, momentum=None, chunk_size: int = 1,
                            max_grad_norm: float | None = 1.0, lengths: torch.Tensor | None = None):
    """Token by token. q, k, v [B, H, T, d]; theta, eta, alpha [B, H, T]; weights: the memory's layers
    [B, H, d_in, d_out] (M_0, fp32); momentum: S_0 (zeros if None). T must be a multiple of ``chunk_size``.
    ``lengths`` [B] (None: all T): a row commits only the chunks its first ``lengths`` tokens complete.
    Returns y [B, H, T, d] (fp32) and the final (weights, momentum)."""
    q, k, v, theta, eta, alpha, weights, momentum = _in_fp32(q, k, v, theta, eta, alpha, weights, momentum,
                                                             chunk_size)
    length = q.shape[2]
    committed, outputs = weights, []
    for start in range(0, length, chunk_size):
        kept_momentum = momentum
        for t in range(start, start + chunk_size):
            factors = token_gradients(committed, k[:, :, t : t + 1], v[:, :, t : t + 1])
            scale = clip_scale(factors, max_grad_norm)
            step = theta[:, :, t, None, None] * (1 if scale is None else scale[..., 0, None, None])
            momentum = [eta[:, :, t, None, None] * s - step * (a.transpose(-1, -2) @ d)
                        for s, (a, d) in zip(momentum, factors)]
            weights = [(1 - alpha[:, :, t, None, None]) * w + s for w, s in zip(weights, momentum)]
        if lengths is not None:  # rows that have not reached the chunk's end keep what they had
            done = (lengths >= start + chunk_size)[:, None, None, None]
            weights = [torch.where(done, new, old) for new, old in zip(weights, committed)]
            momentum = [torch.where(done, new, old) for new, old in zip(momentum, kept_momentum)]
        reads = q[:, :, start : start + chunk_size]
        before = mlp_forward(committed, reads[:, :, :-1])[0]
        committed = weights
        outputs += [before, mlp_forward(committed, reads[:, :, -1:])[0]]
    return torch.cat(outputs, dim=2), weights, momentum


def chunk_step(q, k, v, theta, eta, alpha, weights, momentum, max_grad_norm: float | None = 1.0, done=None):
    """One chunk of n tokens (fp32 inputs, [B, H, n, ...]). With l_eta and l_beta the cumulative sums of log eta
    and log(1 - alpha) from the chunk start:

        S_n = exp(l_eta[n]) S_0 - sum_j theta_j exp(l_eta[n] - l_eta[j]) G_j
        M_n = exp(l_beta[n]) M_0 + sum_i exp(l_beta[n] - l_beta[i]) S_i
            = exp(l_beta[n]) M_0 + f S_0 - sum_j c_j G_j,
        f = sum_i exp(l_beta[n] - l_beta[i] + l_eta[i]),
        c_j = theta_j sum_{i >= j} exp(l_beta[n] - l_beta[i] + l_eta[i] - l_eta[j])

    and each sum over G_j = a_j^T delta_j is one matmul (c * a)^T delta. ``done`` [B] (None: every row) says which
    rows commit the chunk; the others keep their weights and momentum. Returns the chunk's outputs (the last token
    reads the committed weights) and the committed weights and momentum."""
    factors = token_gradients(weights, k, v)
    scale = clip_scale(factors, max_grad_norm)
    step = theta * (1 if scale is None else scale)  # [B, H, n]
    log_eta = torch.log(eta.clamp(min=1e-30)).cumsum(-1)
    log_beta = torch.log1p(-alpha).cumsum(-1)
    causal = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool, device=q.device).tril()  # [i, j]: i >= j
    # decay from token i to the chunk end times momentum carried from j to i: [B, H, i, j]
    carry = (log_beta[..., -1:] - log_beta + log_eta)[..., :, None] - log_eta[..., None, :]
    carry = torch.exp(carry.masked_fill(~causal, float("-inf")))
    coefficient = step * carry.sum(-2)  # c_j
    from_momentum = torch.exp(log_beta[..., -1:] - log_beta + log_eta).sum(-1)  # f
    decay, kept = torch.exp(log_beta[..., -1]), torch.exp(log_eta[..., -1])
    momentum_weights = torch.exp(log_eta[..., -1:] - log_eta) * step  # theta_j exp(l_eta[n] - l_eta[j])
    new_weights, new_momentum = [], []
    for w, s, (a, d) in zip(weights, momentum, factors):
        update = (coefficient[..., None] * a).transpose(-1, -2) @ d
        new_weights.append(decay[..., None, None] * w + from_momentum[..., None, None] * s - update)
        new_momentum.append(kept[..., None, None] * s - (momentum_weights[..., None] * a).transpose(-1, -2) @ d)
    if done is not None:
        commit = done[:, None, None, None]
        new_weights = [torch.where(commit, new, old) for new, old in zip(new_weights, weights)]
        new_momentum = [torch.where(commit, new, old) for new, old in zip(new_momentum, momentum)]
    y = torch.cat([mlp_forward(weights, q[:, :, :-1])[0], mlp_forward(new_weights, q[:, :, -1:])[0]], dim=2)
    return y, new_weights, new_momentum


def neural_memory_chunked(q, k, v, theta, eta, alpha, weights, momentum=None, chunk_size: int = 64,
                          max_grad_norm: float | None = 1.0, lengths: torch.Tensor | None = None):
    """``neural_memory_reference`` chunk by chunk with factored gradients (``chunk_step``). ``lengths`` [B]
    (None: all T): a row commits only the chunks its first ``lengths`` tokens complete; its later positions read
    the weights it committed last (a chunk no row completes costs one read)."""
    q, k, v, theta, eta, alpha, weights, momentum = _in_fp32(q, k, v, theta, eta, alpha, weights, momentum,
                                                             chunk_size)
    outputs = []
    # per-chunk views taken once (split): slicing the full tensors inside the loop would make each chunk's backward
    # write a gradient the size of the whole sequence (quadratic in T)
    chunks = zip(*(t.split(chunk_size, dim=2) for t in (q, k, v, theta, eta, alpha)))
    branch = not torch.compiler.is_compiling()  # looking at ``done`` is a host sync: a compiled graph masks instead
    for n, pieces in enumerate(chunks):
        done = None if lengths is None else lengths >= (n + 1) * chunk_size
        if branch and done is not None and not done.any():
            outputs.append(mlp_forward(weights, pieces[0])[0])
            continue
        if branch and done is not None and done.all():
            done = None
        y, weights, momentum = chunk_step(*pieces, weights, momentum, max_grad_norm, done)
        outputs.append(y)
    return torch.cat(outputs, dim=2), weights, momentum


def neural_memory(q, k, v, theta, eta, alpha, weights, momentum=None, chunk_size: int = 64,
                  max_grad_norm: float | None = 1.0, lengths: torch.Tensor | None = None,
                  use_fused_kernels: bool = True):
    """``neural_memory_chunked``, or on CUDA the project's Triton kernel (``hf_memory.ops.triton_neural_memory``:
    one launch for every chunk) where ``fused_fits`` and no gradient is needed (prefill, evaluation, decode). With
    gradients the kernel's backward recomputes each chunk in PyTorch, so training through it ran at 0.75-1.07x
    of the reference on an H200 (at half its memory): ``neural_memory_fused`` is there to call directly."""
    tensors = (q, k, v, theta, eta, alpha, *weights, *(momentum or ()))
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    fits = not needs_grad and fused_fits(q.shape[-1], weights[0].shape[-1], len(weights), chunk_size)
    kernel = fused_kernel("neural_memory", q, k, v, use_fused_kernels=use_fused_kernels and fits)
    memory = neural_memory_chunked if kernel is None else kernel
    return memory(q, k, v, theta, eta, alpha, weights, momentum, chunk_size=chunk_size, max_grad_norm=max_grad_norm,
                  lengths=lengths)
