"""LoRA training throughput on Qwen2.5-7B's shape: packed (padding-free) vs padded batches.

Builds a randomly initialised model from Qwen2.5-7B's config (no download, no internet), puts
LoRA on it as ``configs/train/qwen2.5-7b-lora.yaml`` does (r 8, alpha 16, all linear layers),
and times optimizer steps in bf16 on the same synthetic documents (lengths like our distilled
answers) batched two ways, side by side:

* ``packed``: documents concatenated into rows of ``--seq-len`` tokens, no padding. With
  ``--attn varlen`` (PyTorch's own flash varlen kernel, ``pipeline/train/varlen.py``) or
  flash-attention 2, position ids restart per document and each document attends only to
  itself; with SDPA the row is one causal sequence, as in LLaMA-Factory's packing;
* ``padded``: the same documents, ``--batch`` at a time, padded to the longest.

Prints tokens/s (real tokens, padding excluded), the packed/padded ratio, the ratio to the
goal (14,000 tokens/s on one H100) and MFU. MFU counts useful FLOPs per token as
``4·N`` (frozen base: forward + activation gradients; LoRA's own are negligible) plus
attention, against the GPU's dense bf16 peak; ``6·N`` (the full-fine-tune convention most
published figures use) is printed alongside.

    python bench/train_throughput.py            # one GPU, 7B shape, ~1 min on an H100/H200
    python bench/train_throughput.py --compile --liger ce --rows 2 --attn varlen  # fastest
    python bench/train_throughput.py --tiny     # CPU, tiny shape, seconds (CI)

Needs torch, transformers and peft; ``--liger`` also needs liger-kernel (pure Python, triton).
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's pipeline package

GOAL_TOKENS_PER_S = 14_000
PEAK_BF16_TFLOPS = {
    "H100 PCIe": 756,
    "H100": 989,
    "H200": 989,
    "H20": 148,
    "A100": 312,
    "L40S": 362,
}

QWEN25_7B = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=32768,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
TINY = dict(
    vocab_size=4000,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=64,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shape on CPU (CI)")
    p.add_argument("--seq-len", type=int, help="tokens per packed row (default 4096, tiny 512)")
    p.add_argument("--batch", type=int, help="documents per padded batch (default 4)")
    p.add_argument("--steps", type=int, help="timed steps per mode (default 20, tiny 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per mode")
    p.add_argument("--doc-len", type=int, nargs=2, help="document length range (300 1500)")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing")
    p.add_argument("--rows", type=int, default=1, help="packed rows per step (default 1)")
    p.add_argument(
        "--attn",
        choices=["auto", "sdpa", "varlen", "flash_attention_2"],
        default="auto",
        help="attention: auto = flash_attention_2 if installed, else sdpa; varlen = PyTorch's "
        "flash varlen kernel, one document per attention (torch >= 2.10 on GPU)",
    )
    p.add_argument(
        "--modes",
        nargs="+",
        choices=["packed", "padded"],
        default=["packed", "padded"],
        help="batching modes to time (default both)",
    )
    p.add_argument(
        "--compile", action="store_true", help="torch.compile each decoder layer (regional)"
    )
    p.add_argument(
        "--liger",
        choices=["all", "ce"],
        help="Liger kernels (GPU only): all = fused linear cross-entropy, RMSNorm, SwiGLU, "
        "RoPE; ce = the fused linear cross-entropy alone",
    )
    p.add_argument(
        "--peak-tflops", type=float, help="dense bf16 peak for MFU (default: by GPU name)"
    )
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def build_model(args, device: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    attn = "sdpa" if args.attn == "auto" else args.attn
    if args.attn == "auto" and device == "cuda":
        try:
            import flash_attn  # noqa: F401

            attn = "flash_attention_2"
        except ImportError:
            pass
    if attn == "varlen":
        from pipeline.train.varlen import parity, register

        register()
        print(f"varlen kernel vs per-document SDPA (fp32): max |Δ| = {parity(device):.1e}")
    if args.liger:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2

        only_ce = args.liger == "ce"  # patch the Qwen2 classes before the model exists
        apply_liger_kernel_to_qwen2(rope=not only_ce, rms_norm=not only_ce, swiglu=not only_ce)
    config = Qwen2Config(**(TINY if args.tiny else QWEN25_7B))
    config._attn_implementation = attn
    dtype = torch.bfloat16
    torch.manual_seed(args.seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)  # random init directly on the device, in bf16
    torch.set_default_dtype(previous)
    model.config.use_cache = False
    if args.grad_ckpt:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    model = get_peft_model(model, lora)
    if args.compile:  # one compiled graph, reused by every layer
        for layer in model.base_model.model.model.layers:
            layer.compile()
    n_params = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return model, config, attn, n_params


def documents(args, count: int, vocab: int) -> list[list[int]]:
    rng = random.Random(args.seed)
    lo, hi = args.doc_len
    return [[rng.randrange(10, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(count)]


def packed_rows(docs, seq_len: int):
    """Rows of exactly ``seq_len`` tokens; position ids restart at each document."""
    ids: list[int] = []
    pos: list[int] = []
    for doc in docs:
        while doc:
            room = seq_len - len(ids)
            piece, doc = doc[:room], doc[room:]
            ids += piece
            pos += range(len(piece))
            if len(ids) == seq_len:
                yield ids, pos
                ids, pos = [], []


def packed_batches(docs, seq_len: int, rows: int):
    """``rows`` packed rows per step."""
    it = packed_rows(docs, seq_len)
    while len(batch := list(itertools.islice(it, rows))) == rows:
        yield batch


def padded_batches(docs, batch: int, seq_len: int):
    for i in range(0, len(docs) - batch + 1, batch):
        yield [d[:seq_len] for d in docs[i : i + batch]]


def run_mode(model, opt, batches, steps: int, warmup: int, device: str, make_inputs):
    import torch

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    tokens = 0
    for i, batch in enumerate(batches):
        if i == warmup:
            sync()
            start, tokens = time.perf_counter(), 0
        inputs, real = make_inputs(batch)
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += real
        if i + 1 == warmup + steps:
            break
    sync()
    return tokens / (time.perf_counter() - start)


def main() -> None:
    import torch

    from pipeline.train.varlen import packed_kwargs

    args = parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    seq_len = args.seq_len or (512 if args.tiny else 4096)
    batch = args.batch or 4
    steps = args.steps or (3 if args.tiny else 20)
    args.doc_len = args.doc_len or ((64, 256) if args.tiny else (300, 1500))
    t0 = time.perf_counter()
    model, config, attn, n_params = build_model(args, device)
    print(
        f"model: {'tiny' if args.tiny else 'Qwen2.5-7B'} shape, {n_params / 1e9:.2f} B frozen "
        f"params, LoRA r8 all-linear, bf16, attention {attn}, "
        f"{f'Liger kernels ({args.liger}), ' if args.liger else ''}"
        f"{args.rows}×{seq_len} packed rows/step, "
        f"{'compiled layers, ' if args.compile else ''}{device} "
        f"({torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}); "
        f"built in {time.perf_counter() - t0:.0f} s"
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    mean_doc = sum(args.doc_len) / 2
    need = int((steps + args.warmup) * max(args.rows * seq_len / mean_doc, batch) * 1.5) + batch
    docs = documents(args, need, config.vocab_size)

    def packed_inputs(rows):
        t = torch.tensor([ids for ids, _ in rows], device=device)
        inputs = {"input_ids": t, "labels": t}
        if attn in ("flash_attention_2", "varlen"):  # varlen kernels: documents stay separate
            pos = torch.tensor([pos for _, pos in rows], device=device)
            inputs["position_ids"] = pos
            if attn == "varlen":  # offsets once per step; the row length bounds every document
                inputs.update(packed_kwargs(pos, max_length=seq_len))
        return inputs, t.numel()

    def padded_inputs(rows):
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = torch.tensor(r)
            mask[j, : len(r)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        return {k: v.to(device) for k, v in inputs.items()}, int(mask.sum())

    results = {}
    modes = [
        ("packed", packed_batches(docs, seq_len, args.rows), packed_inputs),
        ("padded", padded_batches(docs, batch, seq_len), padded_inputs),
    ]
    for name, batches, make in [m for m in modes if m[0] in args.modes]:
        if name == "padded" and attn == "varlen":  # padding needs a mask: SDPA takes over
            model.config._attn_implementation = "sdpa"
        results[name] = run_mode(model, opt, batches, steps, args.warmup, device, make)
        mem = (
            f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
            if device == "cuda"
            else ""
        )
        print(f"{name:>7}: {results[name]:>10,.0f} tokens/s{mem}")

    layers, hidden = config.num_hidden_layers, config.hidden_size
    # fwd+bwd causal attention per token ≈ 12·L·H·context/2, where context is the row length when
    # the row is one sequence, and Σlen²/Σlen over the pieces when each document is on its own
    context = seq_len
    if attn in ("flash_attention_2", "varlen"):
        pieces = [
            n
            for _, pos in packed_rows(docs, seq_len)
            for n in packed_kwargs(torch.tensor(pos))["cu_seq_lens_q"].diff().tolist()
        ]
        context = sum(n * n for n in pieces) / sum(pieces)
    attn_flops = 6 * layers * hidden * context
    useful = 4 * n_params + attn_flops
    if len(results) == 2:
        print(f"  ratio packed/padded: {results['packed'] / results['padded']:.2f}x")
    if "packed" not in results:
        return
    print(
        f"  packed vs goal {GOAL_TOKENS_PER_S:,} tokens/s: "
        f"{results['packed'] / GOAL_TOKENS_PER_S:.2f}x"
    )
    peak = args.peak_tflops
    if peak is None and device == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    if peak:
        mfu4 = results["packed"] * useful / (peak * 1e12)
        mfu6 = results["packed"] * (6 * n_params + attn_flops) / (peak * 1e12)
        print(
            f"  MFU (packed, 4N+attn): {mfu4:.1%}   [6N convention: {mfu6:.1%}]  "
            f"peak {peak:g} TFLOPS; attention context {context:,.0f} tokens"
        )
    else:
        print("  MFU: unknown peak for this device (pass --peak-tflops)")
    if not math.isfinite(results["packed"]):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
