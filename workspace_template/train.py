"""
Pretrain a small GPT for a fixed time budget. Single device, single file.

    python train.py        # in an ar workspace, after `ar prepare`

`ar iterate` runs this file in a sandbox and scores the weights it saves with its own
trusted evaluation (val_bpb, lower is better). Everything here may change, as long as
build_model(config) rebuilds the model from the saved config, model(idx) returns logits
[B, T, vocab], and the run ends with prepare.save_for_eval(model, config). The time
budget, device, data and CPU precision come from prepare.py.
"""

import contextlib
import gc
import math
import sys
import time
from dataclasses import asdict, dataclass

import prepare
import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------
# Hyperparameters
# ---------------------------------------------------------------------------

DEPTH = 8  # transformer layers
ASPECT_RATIO = 64  # model_dim = DEPTH * ASPECT_RATIO, rounded up to a multiple of HEAD_DIM
HEAD_DIM = 128  # attention head dimension
WINDOW_PATTERN = "L"  # per layer, repeating: L = full context, S = half; the last layer is always L.
# All L: PyTorch's fused causal kernel beats masked half windows (H100: 1.50M vs 1.18M tok/s)
TOTAL_BATCH_SIZE = 2**19  # tokens per optimizer step
DEVICE_BATCH_SIZE = 128  # rows per forward/backward; gradients accumulate up to TOTAL_BATCH_SIZE
EMBEDDING_LR = 0.6  # token and value embeddings (AdamW)
UNEMBEDDING_LR = 0.004  # lm_head (AdamW)
MATRIX_LR = 0.04  # attention and MLP matrices (Muon)
SCALAR_LR = 0.5  # per-layer residual scalars (AdamW)
WEIGHT_DECAY = 0.2  # cautious weight decay on Muon matrices, decays to 0 with progress
ADAM_BETAS = (0.8, 0.95)  # AdamW beta1, beta2
WARMUP_RATIO = 0.0  # share of the time budget spent warming the LR up
WARMDOWN_RATIO = 0.5  # share of the time budget spent decaying the LR
FINAL_LR_FRAC = 0.0  # LR at the end, as a fraction of the peak

# ---------------------------------------------------------------------------
# GPT: rotary embeddings, QK-norm, ReLU^2 MLP, value embeddings, sliding windows,
# per-layer residual scalars, logit soft-capping
# ---------------------------------------------------------------------------


@dataclass
class GPTConfig:
    sequence_len: int
    vocab_size: int
    n_layer: int
    n_head: int
    n_kv_head: int
    n_embd: int
    window_pattern: str


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def has_ve(layer_idx, n_layer):
    """Value embeddings on alternating layers, always including the last."""
    return layer_idx % 2 == (n_layer - 1) % 2


def apply_rotary_emb(x, cos, sin):
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], 3)


def sliding_window_mask(seq_len, window, device=None):
    """[T, T] boolean, True where query i may attend key j: j <= i and i - j < window."""
    i = torch.arange(seq_len, device=device)
    distance = i[:, None] - i[None, :]
    return (distance >= 0) & (distance < window)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        assert config.n_embd % config.n_head == 0
        assert self.n_kv_head <= self.n_head and self.n_head % self.n_kv_head == 0
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.ve_gate_channels = 32
        self.ve_gate = nn.Linear(self.ve_gate_channels, self.n_kv_head, bias=False) if has_ve(layer_idx, config.n_layer) else None

    def forward(self, x, ve, cos_sin, mask):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        # Value residual (ResFormer): mix the value embedding in with an input-dependent gate per head
        if ve is not None:
            ve = ve.view(B, T, self.n_kv_head, self.head_dim)
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * ve
        cos, sin = (t.to(q.dtype) for t in cos_sin)
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.n_kv_head < self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        # Full-context layers take the fused causal kernel; windowed ones an explicit mask
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos_sin, mask):
        x = x + self.attn(norm(x), ve, cos_sin, mask)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.window_sizes = self._compute_window_sizes(config)
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        head_dim = config.n_embd // config.n_head
        kv_dim = config.n_kv_head * head_dim
        self.value_embeds = nn.ModuleDict({
            str(i): nn.Embedding(config.vocab_size, kv_dim)
            for i in range(config.n_layer) if has_ve(i, config.n_layer)
        })
        # Rotary tables and window masks are derived, not learned: kept out of the state_dict
        self.rotary_seq_len = config.sequence_len * 10
        cos, sin = self._precompute_rotary_embeddings(self.rotary_seq_len, head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        for window in sorted(set(self.window_sizes)):
            if window < config.sequence_len:
                self.register_buffer(f"mask_{window}", sliding_window_mask(config.sequence_len, window), persistent=False)

    @torch.no_grad()
    def init_weights(self):
        torch.nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        torch.nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        # Uniform with the std of a 1/sqrt(n_embd) normal; output projections start at zero
        s = 3**0.5 * self.config.n_embd**-0.5
        for block in self.transformer.h:
            torch.nn.init.uniform_(block.attn.c_q.weight, -s, s)
            torch.nn.init.uniform_(block.attn.c_k.weight, -s, s)
            torch.nn.init.uniform_(block.attn.c_v.weight, -s, s)
            torch.nn.init.zeros_(block.attn.c_proj.weight)
            torch.nn.init.uniform_(block.mlp.c_fc.weight, -s, s)
            torch.nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                torch.nn.init.zeros_(block.attn.ve_gate.weight)  # sigmoid(0) * 2 = 1: neutral gate
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)
        for ve in self.value_embeds.values():
            torch.nn.init.uniform_(ve.weight, -s, s)

    def _precompute_rotary_embeddings(self, seq_len, head_dim, base=10000):
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
        return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]

    def _compute_window_sizes(self, config):
        pattern = config.window_pattern.upper()
        assert pattern and all(c in "SL" for c in pattern), f"bad window pattern {config.window_pattern!r}"
        long_window, short_window = config.sequence_len, config.sequence_len // 2
        sizes = [long_window if pattern[i % len(pattern)] == "L" else short_window for i in range(config.n_layer)]
        sizes[-1] = long_window
        return sizes

    def _attention_mask(self, window, seq_len, device):
        if window >= seq_len:
            return None
        if seq_len <= self.config.sequence_len:
            return getattr(self, f"mask_{window}")[:seq_len, :seq_len]
        return sliding_window_mask(seq_len, window, device)

    def estimate_flops(self):
        """Matmul FLOPs per token, forward + backward (embedding lookups excluded)."""
        nparams = sum(p.numel() for p in self.parameters())
        nparams_exclude = (self.transformer.wte.weight.numel() + sum(ve.weight.numel() for ve in self.value_embeds.values())
                           + self.resid_lambdas.numel() + self.x0_lambdas.numel())
        h, q, t = self.config.n_head, self.config.n_embd // self.config.n_head, self.config.sequence_len
        attn_flops = sum(12 * h * q * min(window, t) for window in self.window_sizes)
        return 6 * (nparams - nparams_exclude) + attn_flops

    def forward(self, idx, targets=None, reduction="mean"):
        B, T = idx.size()
        assert T <= self.cos.size(1), f"sequence of {T} tokens is longer than the rotary table"
        cos_sin = self.cos[:, :T], self.sin[:, :T]
        masks = {window: self._attention_mask(window, T, idx.device) for window in set(self.window_sizes)}
        x = norm(self.transformer.wte(idx))
        x0 = x
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos_sin, masks[self.window_sizes[i]])
        x = norm(x)
        softcap = 15  # tanh soft-capping keeps logits bounded early in training
        logits = self.lm_head(x).float()
        logits = softcap * torch.tanh(logits / softcap)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1, reduction=reduction)


def model_config(vocab_size, sequence_len):
    """The config dict of this file's model: everything build_model needs to rebuild it."""
    model_dim = ((DEPTH * ASPECT_RATIO + HEAD_DIM - 1) // HEAD_DIM) * HEAD_DIM
    num_heads = model_dim // HEAD_DIM
    return asdict(GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=DEPTH, n_head=num_heads,
                            n_kv_head=num_heads, n_embd=model_dim, window_pattern=WINDOW_PATTERN))


def build_model(config):
    """A freshly initialised GPT for `config` (from model_config), on CPU in float32."""
    model = GPT(GPTConfig(**config))
    model.init_weights()
    return model

# ---------------------------------------------------------------------------
# Optimizer: Muon for the 2D matrices of the blocks, AdamW for everything else
# ---------------------------------------------------------------------------

# Polar Express: per-iteration coefficients of the odd polynomial that drives a matrix
# towards its orthogonal polar factor, faster than fixed Newton-Schulz coefficients.
polar_express_coeffs = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def adamw_step(p, grad, exp_avg, exp_avg_sq, step_t, lr_t, beta1_t, beta2_t, eps_t, wd_t):
    p.mul_(1 - lr_t * wd_t)
    exp_avg.lerp_(grad, 1 - beta1_t)
    exp_avg_sq.lerp_(grad.square(), 1 - beta2_t)
    bias1 = 1 - beta1_t ** step_t
    bias2 = 1 - beta2_t ** step_t
    denom = (exp_avg_sq / bias2).sqrt() + eps_t
    p.add_(exp_avg / denom * (-lr_t / bias1))


def muon_step(stacked_grads, stacked_params, momentum_buffer, second_momentum_buffer,
              momentum_t, lr_t, wd_t, beta2_t, ns_steps, red_dim, ortho_dtype):
    # Nesterov momentum
    momentum = momentum_t.to(stacked_grads.dtype)
    momentum_buffer.lerp_(stacked_grads, 1 - momentum)
    g = stacked_grads.lerp_(momentum_buffer, momentum)
    # Orthogonalise the update (Polar Express), iterating on the smaller Gram matrix
    X = g.to(ortho_dtype)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    if g.size(-2) > g.size(-1):
        for a, b, c in polar_express_coeffs[:ns_steps]:
            A = X.mT @ X
            X = a * X + X @ (b * A + c * (A @ A))
    else:
        for a, b, c in polar_express_coeffs[:ns_steps]:
            A = X @ X.mT
            X = a * X + (b * A + c * (A @ A)) @ X
    g = X
    # NorMuon: normalise per row (or column) with a second moment, keeping the overall norm
    beta2 = beta2_t.to(g.dtype)
    v_mean = g.float().square().mean(dim=red_dim, keepdim=True)
    red_dim_size = g.size(red_dim)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * red_dim_size).sqrt()
    second_momentum_buffer.lerp_(v_mean.to(dtype=second_momentum_buffer.dtype), 1 - beta2)
    step_size = second_momentum_buffer.clamp_min(1e-10).rsqrt()
    scaled_sq_sum = (v_mean * red_dim_size) * step_size.float().square()
    v_norm_new = scaled_sq_sum.sum(dim=(-2, -1), keepdim=True).sqrt()
    g = g * (step_size * (v_norm / v_norm_new.clamp_min(1e-10))).to(g.dtype)
    # Cautious weight decay: only where the update and the weight agree in sign
    lr = lr_t.to(g.dtype)
    wd = wd_t.to(g.dtype)
    mask = (g * stacked_params) >= 0
    stacked_params.sub_(lr * g + lr * wd * stacked_params * mask)


class MuonAdamW(torch.optim.Optimizer):
    """Muon for groups of same-shape matrices (kind='muon'), AdamW for the rest (kind='adamw')."""

    def __init__(self, param_groups, compile=False, ortho_dtype=torch.bfloat16):
        super().__init__(param_groups, defaults={})
        self.ortho_dtype = ortho_dtype
        self._adamw = torch.compile(adamw_step, dynamic=False, fullgraph=True) if compile else adamw_step
        self._muon = torch.compile(muon_step, dynamic=False, fullgraph=True) if compile else muon_step
        # 0-D CPU tensors: changing a value does not recompile the compiled steps
        names = ["step", "lr", "beta1", "beta2", "eps", "wd", "momentum", "muon_lr", "muon_wd", "muon_beta2"]
        self._t = {name: torch.tensor(0.0, dtype=torch.float32) for name in names}

    def _step_adamw(self, group):
        t = self._t
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t["step"].fill_(state["step"])
            t["lr"].fill_(group["lr"])
            t["beta1"].fill_(group["betas"][0])
            t["beta2"].fill_(group["betas"][1])
            t["eps"].fill_(group["eps"])
            t["wd"].fill_(group["weight_decay"])
            self._adamw(p, p.grad, state["exp_avg"], state["exp_avg_sq"],
                        t["step"], t["lr"], t["beta1"], t["beta2"], t["eps"], t["wd"])

    def _step_muon(self, group):
        params = group["params"]
        t = self._t
        shape = params[0].shape
        state = self.state[params[0]]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros(len(params), *shape, dtype=params[0].dtype, device=params[0].device)
            second_shape = (len(params), shape[-2], 1) if shape[-2] >= shape[-1] else (len(params), 1, shape[-1])
            state["second_momentum_buffer"] = torch.zeros(second_shape, dtype=params[0].dtype, device=params[0].device)
        red_dim = -1 if shape[-2] >= shape[-1] else -2
        stacked_grads = torch.stack([p.grad for p in params])
        stacked_params = torch.stack(params)
        t["momentum"].fill_(group["momentum"])
        t["muon_beta2"].fill_(group["beta2"])
        t["muon_lr"].fill_(group["lr"] * max(1.0, shape[-2] / shape[-1]) ** 0.5)  # tall matrices take larger steps
        t["muon_wd"].fill_(group["weight_decay"])
        self._muon(stacked_grads, stacked_params, state["momentum_buffer"], state["second_momentum_buffer"],
                   t["momentum"], t["muon_lr"], t["muon_wd"], t["muon_beta2"], group["ns_steps"], red_dim, self.ortho_dtype)
        torch._foreach_copy_(params, list(stacked_params.unbind(0)))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            if group["kind"] == "adamw":
                self._step_adamw(group)
            else:
                self._step_muon(group)


def setup_optimizer(model, compile=False, ortho_dtype=torch.bfloat16):
    matrix_params = list(model.transformer.h.parameters())
    # AdamW LRs were tuned at model_dim 768; scale them as 1/sqrt(model_dim)
    dmodel_lr_scale = (model.config.n_embd / 768) ** -0.5
    param_groups = [
        dict(kind="adamw", params=list(model.lm_head.parameters()), lr=UNEMBEDDING_LR * dmodel_lr_scale, betas=ADAM_BETAS, eps=1e-10, weight_decay=0.0),
        dict(kind="adamw", params=list(model.transformer.wte.parameters()), lr=EMBEDDING_LR * dmodel_lr_scale, betas=ADAM_BETAS, eps=1e-10, weight_decay=0.0),
        dict(kind="adamw", params=list(model.value_embeds.parameters()), lr=EMBEDDING_LR * dmodel_lr_scale, betas=ADAM_BETAS, eps=1e-10, weight_decay=0.0),
        dict(kind="adamw", params=[model.resid_lambdas], lr=SCALAR_LR * 0.01, betas=ADAM_BETAS, eps=1e-10, weight_decay=0.0),
        dict(kind="adamw", params=[model.x0_lambdas], lr=SCALAR_LR, betas=(0.96, 0.95), eps=1e-10, weight_decay=0.0),
    ]
    for shape in sorted({p.shape for p in matrix_params}):
        param_groups.append(dict(kind="muon", params=[p for p in matrix_params if p.shape == shape], lr=MATRIX_LR,
                                 momentum=0.95, ns_steps=5, beta2=0.95, weight_decay=WEIGHT_DECAY))
    grouped = sum(len(group["params"]) for group in param_groups)
    assert grouped == len(list(model.parameters())), "every parameter needs exactly one optimizer group"
    optimizer = MuonAdamW(param_groups, compile=compile, ortho_dtype=ortho_dtype)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    return optimizer

# ---------------------------------------------------------------------------
# Schedules: all driven by progress = training seconds / TIME_BUDGET
# ---------------------------------------------------------------------------


def get_lr_multiplier(progress):
    if progress < WARMUP_RATIO:
        return progress / WARMUP_RATIO
    if progress < 1.0 - WARMDOWN_RATIO:
        return 1.0
    cooldown = (1.0 - progress) / WARMDOWN_RATIO
    return cooldown + (1 - cooldown) * FINAL_LR_FRAC


def get_muon_momentum(step):
    frac = min(step / 300, 1)
    return (1 - frac) * 0.85 + frac * 0.95


def get_weight_decay(progress):
    return WEIGHT_DECAY * (1 - progress)

# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def main():
    t_start = time.time()
    torch.manual_seed(prepare.SEED)  # ar gives each run its seed
    cuda = prepare.DEVICE == "cuda"
    device = torch.device(prepare.DEVICE)
    if cuda:
        torch.cuda.manual_seed(prepare.SEED)
        torch.set_float32_matmul_precision("high")
    # prepare.py says which precision this machine runs fastest: bf16 on CUDA, and on CPU
    # bf16 only where it was measured faster (without native bf16 it is ~16x slower).
    # torch.compile on CUDA only: on CPU it takes 40 s to compile and is no faster.
    autocast_ctx = (torch.amp.autocast(device_type=device.type, dtype=prepare.AUTOCAST_DTYPE)
                    if prepare.AUTOCAST_DTYPE != torch.float32 else contextlib.nullcontext())
    clock = prepare.BudgetClock(warmup_steps=10 if cuda else 1)  # first steps compile and warm up: not billed
    peak_flops = 989.5e12 if cuda else 0.0  # H100 bf16 dense; no reference peak on CPU

    tokenizer = prepare.Tokenizer.from_directory()
    config = model_config(tokenizer.vocab_size, prepare.MAX_SEQ_LEN)
    print(f"Model config: {config}")
    model = build_model(config).to(device)
    if cuda:  # embeddings are only gathered: bf16 storage halves their memory and bandwidth
        model.transformer.wte.to(dtype=torch.bfloat16)
        for ve in model.value_embeds.values():
            ve.to(dtype=torch.bfloat16)
    num_params = sum(p.numel() for p in model.parameters())
    num_flops_per_token = model.estimate_flops()
    print(f"Parameters: {num_params:,} | FLOPs per token: {num_flops_per_token:e}")

    tokens_per_fwdbwd = DEVICE_BATCH_SIZE * prepare.MAX_SEQ_LEN
    assert TOTAL_BATCH_SIZE % tokens_per_fwdbwd == 0, "TOTAL_BATCH_SIZE must be a multiple of DEVICE_BATCH_SIZE * MAX_SEQ_LEN"
    grad_accum_steps = TOTAL_BATCH_SIZE // tokens_per_fwdbwd
    optimizer = setup_optimizer(model, compile=cuda, ortho_dtype=prepare.MUON_DTYPE)
    train_model = torch.compile(model, dynamic=False) if cuda else model

    train_loader = prepare.make_dataloader(tokenizer, DEVICE_BATCH_SIZE, prepare.MAX_SEQ_LEN)
    x, y, epoch = next(train_loader)
    print(f"Time budget: {prepare.TIME_BUDGET:g}s | device: {prepare.DEVICE} | gradient accumulation steps: {grad_accum_steps}")
    print(f"Precision: autocast {prepare.AUTOCAST_DTYPE} | Muon orthogonalisation {prepare.MUON_DTYPE} | "
          f"threads {torch.get_num_threads()} ({prepare.PRECISION_REASON})")

    smooth_train_loss = 0.0
    step = 0
    while True:
        if cuda:
            torch.cuda.synchronize()
        clock.start_step(step)
        for _ in range(grad_accum_steps):
            with autocast_ctx:
                loss = train_model(x, y)
            train_loss = loss.detach()
            (loss / grad_accum_steps).backward()
            x, y, epoch = next(train_loader)

        progress = clock.progress
        lrm = get_lr_multiplier(progress)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = get_muon_momentum(step)
                group["weight_decay"] = get_weight_decay(progress)
        optimizer.step()
        model.zero_grad(set_to_none=True)

        train_loss_f = train_loss.item()
        if not math.isfinite(train_loss_f) or train_loss_f > 100:
            print()
            sys.exit(f"FAIL: training loss is {train_loss_f} at step {step} (NaN or exploding); lower the learning rates or fix the model")

        if cuda:
            torch.cuda.synchronize()
        dt = clock.end_step(step)

        ema_beta = 0.9
        smooth_train_loss = ema_beta * smooth_train_loss + (1 - ema_beta) * train_loss_f
        debiased_smooth_loss = smooth_train_loss / (1 - ema_beta ** (step + 1))
        tok_per_sec = int(TOTAL_BATCH_SIZE / dt)
        mfu = 100 * num_flops_per_token * TOTAL_BATCH_SIZE / dt / peak_flops if peak_flops else 0.0
        remaining = clock.remaining
        print(f"\rstep {step:05d} ({100 * progress:.1f}%) | loss: {debiased_smooth_loss:.6f} | lrm: {lrm:.2f} | dt: {dt * 1000:.0f}ms | "
              f"tok/sec: {tok_per_sec:,} | mfu: {mfu:.1f}% | epoch: {epoch} | remaining: {remaining:.0f}s    ", end="", flush=True)

        # Python's GC stalls for hundreds of ms; everything long-lived exists after step 0
        if step == 0:
            gc.collect()
            gc.freeze()
            gc.disable()
        elif (step + 1) % 5000 == 0:
            gc.collect()

        step += 1
        if clock.over(step):
            break
    print()

    counted_steps = step - clock.warmup_steps
    steady_mfu = 100 * num_flops_per_token * TOTAL_BATCH_SIZE * counted_steps / clock.seconds / peak_flops if peak_flops else 0.0
    peak_vram_mb = torch.cuda.max_memory_allocated() / 1024 / 1024 if cuda else 0.0
    print("---")
    print(f"training_seconds: {clock.seconds:.1f}")
    print(f"total_seconds:    {time.time() - t_start:.1f}")
    print(f"peak_vram_mb:     {peak_vram_mb:.1f}")
    print(f"mfu_percent:      {steady_mfu:.2f}")
    print(f"total_tokens_M:   {step * TOTAL_BATCH_SIZE / 1e6:.3f}")
    print(f"num_steps:        {step}")
    print(f"num_params_M:     {num_params / 1e6:.1f}")
    print(f"depth:            {DEPTH}", flush=True)
    prepare.save_for_eval(model, config)


if __name__ == "__main__":
    main()
