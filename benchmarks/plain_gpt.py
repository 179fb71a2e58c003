"""
A plain GPT baseline that follows the train.py contract, for comparison with the template.

Learned positions, LayerNorm, standard causal attention, GELU MLP, tied embeddings,
AdamW only, linear warmup then cosine decay over the time budget. Same size, precision
and data path as the cpu profile's train.py, so the trusted evaluation scores both alike:

    cp benchmarks/plain_gpt.py WORKSPACE/train.py && (cd WORKSPACE && python train.py)
"""

import contextlib
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

DEPTH = 2  # transformer layers
MODEL_DIM = 128  # residual width
N_HEAD = 2  # attention heads
DEVICE_BATCH_SIZE = 4  # rows per step
LEARNING_RATE = 1e-3  # AdamW peak LR
WEIGHT_DECAY = 0.1  # AdamW decoupled weight decay on matrices
ADAM_BETAS = (0.9, 0.95)  # AdamW beta1, beta2
WARMUP_RATIO = 0.05  # share of the time budget spent warming the LR up
FINAL_LR_FRAC = 0.1  # cosine decay ends at this fraction of the peak

# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


@dataclass
class PlainConfig:
    sequence_len: int
    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.attn_proj = nn.Linear(config.n_embd, config.n_embd)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.mlp_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.qkv(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp_proj(F.gelu(self.fc(self.ln_2(x))))


class PlainGPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.sequence_len, config.n_embd)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 2:
                # GPT-2: std 0.02, residual projections scaled down by depth
                std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx):
        B, T = idx.size()
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x)).float()


def build_model(config):
    return PlainGPT(PlainConfig(**config))

# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def get_lr(progress):
    if progress < WARMUP_RATIO:
        return LEARNING_RATE * progress / WARMUP_RATIO
    decay = (progress - WARMUP_RATIO) / (1 - WARMUP_RATIO)
    return LEARNING_RATE * (FINAL_LR_FRAC + (1 - FINAL_LR_FRAC) * 0.5 * (1 + math.cos(math.pi * decay)))


def main():
    t_start = time.time()
    torch.manual_seed(42)
    cuda = prepare.DEVICE == "cuda"
    # The same precision as the template's train.py (the fastest this machine runs), so only the recipe differs
    autocast_ctx = (torch.amp.autocast(device_type=prepare.DEVICE, dtype=prepare.AUTOCAST_DTYPE)
                    if prepare.AUTOCAST_DTYPE != torch.float32 else contextlib.nullcontext())
    tokenizer = prepare.Tokenizer.from_directory()
    config = asdict(PlainConfig(sequence_len=prepare.MAX_SEQ_LEN, vocab_size=tokenizer.vocab_size,
                                n_layer=DEPTH, n_head=N_HEAD, n_embd=MODEL_DIM))
    model = build_model(config).to(prepare.DEVICE)
    num_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=LEARNING_RATE, betas=ADAM_BETAS)
    loader = prepare.make_dataloader(tokenizer, DEVICE_BATCH_SIZE, prepare.MAX_SEQ_LEN)
    print(f"Model config: {config} | parameters: {num_params:,}")
    print(f"Precision: autocast {prepare.AUTOCAST_DTYPE} | threads {torch.get_num_threads()} ({prepare.PRECISION_REASON})")

    total_training_time = 0.0
    step = 0
    while total_training_time < prepare.TIME_BUDGET:
        t0 = time.time()
        x, y, epoch = next(loader)
        progress = total_training_time / prepare.TIME_BUDGET
        for group in optimizer.param_groups:
            group["lr"] = get_lr(progress)
        with autocast_ctx:
            logits = model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_f = loss.item()
        if not math.isfinite(loss_f) or loss_f > 100:
            print()
            sys.exit(f"FAIL: training loss is {loss_f} at step {step}")
        dt = time.time() - t0
        if step > 0:  # the first step allocates everything
            total_training_time += dt
        remaining = max(0.0, prepare.TIME_BUDGET - total_training_time)
        print(f"\rstep {step:05d} ({100 * progress:.1f}%) | loss: {loss_f:.6f} | dt: {dt * 1000:.0f}ms | "
              f"epoch: {epoch} | remaining: {remaining:.0f}s    ", end="", flush=True)
        step += 1
    print()

    tokens = step * DEVICE_BATCH_SIZE * prepare.MAX_SEQ_LEN
    print("---")
    print(f"training_seconds: {total_training_time:.1f}")
    print(f"total_seconds:    {time.time() - t_start:.1f}")
    print(f"peak_vram_mb:     {torch.cuda.max_memory_allocated() / 1024 / 1024 if cuda else 0.0:.1f}")
    print("mfu_percent:      0.00")
    print(f"total_tokens_M:   {tokens / 1e6:.3f}")
    print(f"num_steps:        {step}")
    print(f"num_params_M:     {num_params / 1e6:.1f}")
    print(f"depth:            {DEPTH}", flush=True)
    prepare.save_for_eval(model, config)


if __name__ == "__main__":
    main()
