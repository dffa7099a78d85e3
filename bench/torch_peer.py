#!/usr/bin/env python3
"""PyTorch peer for bench/gpu_bench.c: the same GPT-2 shapes, measured the
way a PyTorch user would run them.

Training: a nanoGPT-style model (pre-LN blocks, tanh GELU, tied head,
F.scaled_dot_product_attention with is_causal, i.e. flash attention), bf16
autocast, fused AdamW, gradient clipping at 1.0; eager and torch.compile.
Generation: the same model with a preallocated KV cache, greedy on the GPU
(batch 1 and 32), and Hugging Face GPT2LMHeadModel.generate (greedy, bf16,
KV cache on) on a model of the same shape.

Prints "PEER <key> <tokens per second>" lines that gpu_bench reads; any
other line is commentary. A part that cannot run prints why and is left out.
"""
import argparse
import math
import sys
import time

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except Exception as e:  # no PyTorch: say so, report nothing
    print(f"torch not available: {e}")
    sys.exit(0)


class Block(nn.Module):
    def __init__(self, C, H):
        super().__init__()
        self.H = H
        self.ln1 = nn.LayerNorm(C)
        self.qkv = nn.Linear(C, 3 * C)
        self.proj = nn.Linear(C, C)
        self.ln2 = nn.LayerNorm(C)
        self.fc = nn.Linear(C, 4 * C)
        self.fcproj = nn.Linear(4 * C, C)

    def attn(self, x, cache=None, pos=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.H, C // self.H).transpose(1, 2)
        k = k.view(B, T, self.H, C // self.H).transpose(1, 2)
        v = v.view(B, T, self.H, C // self.H).transpose(1, 2)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            kc, vc = cache
            kc[:, :, pos:pos + T] = k
            vc[:, :, pos:pos + T] = v
            K, Vv = kc[:, :, :pos + T], vc[:, :, :pos + T]
            y = F.scaled_dot_product_attention(q, K, Vv, is_causal=(T > 1))
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))

    def forward(self, x, cache=None, pos=None):
        x = x + self.attn(self.ln1(x), cache, pos)
        return x + self.fcproj(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.wte = nn.Embedding(a.padded_vocab, a.width)
        self.wpe = nn.Embedding(a.context, a.width)
        self.blocks = nn.ModuleList([Block(a.width, a.heads) for _ in range(a.layers)])
        self.lnf = nn.LayerNorm(a.width)
        self.vocab = a.vocab

    def forward(self, idx, targets=None, caches=None, pos=0):
        B, T = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(pos, pos + T, device=idx.device))
        for i, b in enumerate(self.blocks):
            x = b(x, None if caches is None else caches[i], pos)
        logits = self.lnf(x) @ self.wte.weight.t()
        if targets is None:
            return logits
        return F.cross_entropy(logits[..., : self.vocab].float().reshape(-1, self.vocab),
                               targets.reshape(-1))


def sync():
    torch.cuda.synchronize()


def train(a, compiled):
    torch.manual_seed(1)
    model = GPT(a).cuda()
    step_model = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=True)
    x = torch.randint(0, a.vocab, (a.batch, a.seq + 1), device="cuda")
    inp, tgt = x[:, :-1].contiguous(), x[:, 1:].contiguous()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step_model(inp, tgt)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(3):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    loss.item()
    dt = time.perf_counter() - t0
    return a.batch * a.seq * a.steps / dt


@torch.no_grad()
def generate_loop(a, batch):
    torch.manual_seed(1)
    model = GPT(a).cuda().to(torch.bfloat16).eval()
    hs = a.width // a.heads
    caches = [(torch.empty(batch, a.heads, a.context, hs, device="cuda", dtype=torch.bfloat16),
               torch.empty(batch, a.heads, a.context, hs, device="cuda", dtype=torch.bfloat16))
              for _ in range(a.layers)]
    best = 0
    for _ in range(2):
        prompt = torch.randint(0, a.vocab, (batch, a.prompt), device="cuda")
        logits = model(prompt, caches=caches, pos=0)
        tok = logits[:, -1, : a.vocab].argmax(-1, keepdim=True)
        sync()
        t0 = time.perf_counter()
        for i in range(a.gen):
            logits = model(tok, caches=caches, pos=a.prompt + i)
            tok = logits[:, -1, : a.vocab].argmax(-1, keepdim=True)
        sync()
        best = max(best, batch * a.gen / (time.perf_counter() - t0))
    return best


@torch.no_grad()
def generate_hf(a, batch):
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=a.vocab, n_positions=a.context, n_embd=a.width,
                     n_layer=a.layers, n_head=a.heads)
    model = GPT2LMHeadModel(cfg).cuda().to(torch.bfloat16).eval()
    prompt = torch.randint(0, a.vocab, (batch, a.prompt), device="cuda")
    best = 0
    for _ in range(2):
        sync()
        t0 = time.perf_counter()
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                             max_new_tokens=a.gen, min_new_tokens=a.gen, do_sample=False,
                             use_cache=True, pad_token_id=0)
        sync()
        n = out.shape[1] - a.prompt
        best = max(best, batch * n / (time.perf_counter() - t0))
    return best


def main():
    p = argparse.ArgumentParser()
    for k in ("vocab", "padded-vocab", "context", "layers", "heads", "width", "batch", "seq",
              "steps", "prompt", "gen"):
        p.add_argument("--" + k, type=int, required=True)
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("torch sees no GPU")
        return
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}")
    parts = [("train_eager", lambda: train(a, False)),
             ("train_compile", lambda: train(a, True)),
             ("gen1_loop", lambda: generate_loop(a, 1)),
             ("gen32_loop", lambda: generate_loop(a, 32)),
             ("gen1_hf", lambda: generate_hf(a, 1)),
             ("gen32_hf", lambda: generate_hf(a, 32))]
    for key, fn in parts:
        t0 = time.perf_counter()
        try:
            v = fn()
        except Exception as e:
            print(f"{key}: not measured: {type(e).__name__}: {e}")
            continue
        finally:
            torch.cuda.empty_cache()
        print(f"PEER {key} {v:.1f}   ({time.perf_counter() - t0:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
