"""Merge a LoRA adapter into its base and prove the merged model is the same function.

Parity: the logits of base+adapter (PEFT, unmerged) and of the merged model *re-loaded from
disk* are compared on a handful of training conversations, every position. They must agree
within ``rtol * max|logit| + atol``:

* fp32 (CPU): rtol 1e-5, atol 1e-4. Merging only re-orders floating-point sums
  (``W x + s·B(A x)`` vs ``(W + s·BA) x``); fp32 rounding (eps 1.2e-7) accumulated over a few
  thousand-term dot products and the layers stays orders of magnitude below that.
* bf16 (GPU): rtol 2^-6, atol 0.02. Storing ``W + s·BA`` in bf16 rounds each weight to
  8 significant bits (eps 2^-8); a few ulps at the logit scale is the unavoidable floor.

A wrong merge (adapter dropped, applied twice, wrong scaling, mismatched weights) moves the
logits by the size of the adapter's own effect; the manifest records that effect next to the
error so the margin is visible, and a warning says when the adapter is too weak to tell.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

MANIFEST = "distill_manifest.json"
TOLERANCES = {"float32": (1e-5, 1e-4), "bfloat16": (2**-6, 2e-2)}
GENERIC_PROMPTS = ["Hello! Who are you?", "1 + 1 = ?", "Classify: the market rose today."]


class MergeError(RuntimeError):
    """The merge was refused or its result failed verification."""


@dataclass(frozen=True)
class Parity:
    """How far the merged model's logits are from base+adapter's."""

    max_abs_diff: float
    tolerance: float
    max_abs_logit: float
    adapter_effect: float  # max |logits(base+adapter) - logits(base)|
    dtype: str
    prompts: int
    tokens: int

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def check_not_quantized(base: str) -> None:
    """Refuse a quantized base: merging into rounded int weights silently loses the adapter."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base)
    quant = getattr(config, "quantization_config", None)
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else type(quant).__name__
        raise MergeError(
            f"{base}: the base model is quantized ({method}); merging a LoRA adapter into "
            "quantized weights loses precision and cannot be served as one model. Pass --base "
            "with the original bf16/fp16 weights the adapter was trained against."
        )


def parity_inputs(tokenizer, adapter: Path, limit: int = 4) -> list[list[int]]:
    """Token ids of a few training conversations (prompt + answer), or generic chats."""
    from pipeline.train.data import DataError, load_dataset

    data_file = _read_json(adapter / "train_metrics.json").get("data_file")
    convos = []
    if data_file and Path(data_file).exists():
        try:
            examples = load_dataset(data_file).examples[:limit]
            convos = [[*e.prompt, {"role": "assistant", "content": e.answer}] for e in examples]
        except DataError:
            convos = []
    if not convos:
        convos = [[{"role": "user", "content": p}] for p in GENERIC_PROMPTS]
    out = []
    for convo in convos:
        ids = tokenizer.apply_chat_template(convo, tokenize=True, return_dict=True)["input_ids"]
        out.append(list(ids)[:512])
    return out


def logits(model, inputs: list[list[int]]) -> list:
    """fp32 logits for each input (one sequence at a time: no padding effects)."""
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        return [model(torch.tensor([ids], device=device)).logits[0].float().cpu() for ids in inputs]


def compare(reference: list, merged: list, base: list, dtype: str) -> Parity:
    """Parity of ``merged`` against ``reference`` logits (``base`` only sizes the adapter)."""
    rtol, atol = TOLERANCES[dtype]
    diff = max(float((r - m).abs().max()) for r, m in zip(reference, merged, strict=True))
    scale = max(float(r.abs().max()) for r in reference)
    effect = max(float((r - b).abs().max()) for r, b in zip(reference, base, strict=True))
    return Parity(
        max_abs_diff=diff,
        tolerance=rtol * scale + atol,
        max_abs_logit=scale,
        adapter_effect=effect,
        dtype=dtype,
        prompts=len(reference),
        tokens=sum(r.shape[0] for r in reference),
    )


def _load(path: str | Path, dtype, device):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()


def reference_logits(base: str, adapter: Path, inputs, dtype, device) -> tuple[list, list]:
    """Logits of base+adapter (unmerged) and of the bare base."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(_load(base, dtype, device), str(adapter)).eval()
    ref = logits(model, inputs)
    with model.disable_adapter():
        bare = logits(model, inputs)
    return ref, bare


def verify(base: str, adapter: Path, merged: Path, inputs, dtype=None, device=None) -> Parity:
    """Recompute parity of a merged directory from scratch (used by tests and re-checks)."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    ref, bare = reference_logits(base, adapter, inputs, dtype, device)
    return compare(ref, logits(_load(merged, dtype, device), inputs), bare, str(dtype)[6:])


def _generation_config(base: str, tokenizer):
    """The base's generation config with the tokenizer's end-of-turn token as first EOS."""
    from transformers import GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(base)
    except OSError:
        gen = GenerationConfig()
    eos = gen.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    gen.eos_token_id = [tokenizer.eos_token_id, *[e for e in eos if e != tokenizer.eos_token_id]]
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    return gen


def merge(base: str | None, adapter: str | Path, out: str | Path, console=None) -> dict:
    """Merge ``adapter`` into ``base``, save to ``out``, verify parity, write the manifest."""
    import torch
    from rich.console import Console
    from transformers import AutoTokenizer

    console = console or Console(stderr=True)
    adapter, out = Path(adapter), Path(out)
    adapter_cfg = _read_json(adapter / "adapter_config.json")
    if not adapter_cfg:
        raise MergeError(f"{adapter}: no adapter_config.json; is this a `distill train` output?")
    base = base or adapter_cfg.get("base_model_name_or_path")
    if not base:
        raise MergeError(f"{adapter}: adapter names no base model; pass --base")
    check_not_quantized(base)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    dtype_name = str(dtype)[6:]
    tok_dir = adapter if (adapter / "tokenizer_config.json").exists() else base
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    inputs = parity_inputs(tokenizer, adapter)

    with console.status(f"merging {adapter} into {base} ({dtype_name}, {device})"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(_load(base, dtype, device), str(adapter)).eval()
        ref = logits(model, inputs)
        with model.disable_adapter():
            bare = logits(model, inputs)
        merged = model.merge_and_unload()
        out.mkdir(parents=True, exist_ok=True)
        merged.save_pretrained(str(out), safe_serialization=True)
        del model, merged
        tokenizer.save_pretrained(str(out))
        _generation_config(base, tokenizer).save_pretrained(str(out))
    with console.status("verifying the merged model against base + adapter"):
        parity = compare(ref, logits(_load(out, dtype, device), inputs), bare, dtype_name)
    if not parity.ok:
        raise MergeError(
            f"{out}: merged logits differ from base + adapter by {parity.max_abs_diff:.3g} "
            f"(tolerance {parity.tolerance:.3g}, {dtype_name}); the merge is not faithful"
        )
    if parity.adapter_effect <= parity.tolerance:
        console.print(
            f"[yellow]the adapter changes logits by only {parity.adapter_effect:.3g}, within the "
            "parity tolerance: the check cannot tell a merged model from the base[/]"
        )
    train_metrics = _read_json(adapter / "train_metrics.json")
    manifest = {
        "base": base,
        "adapter": str(adapter),
        "data_file": train_metrics.get("data_file"),
        "data_sha256": train_metrics.get("data_sha256"),
        "train_config": train_metrics.get("config"),
        "lora": {k: adapter_cfg.get(k) for k in ("r", "lora_alpha", "target_modules")},
        "dtype": dtype_name,
        "parity": {**asdict(parity), "ok": parity.ok},
        "chat_template_sha256": hashlib.sha256(
            (tokenizer.chat_template or "").encode()
        ).hexdigest(),
        "eos_token": tokenizer.eos_token,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False, default=str))
    console.print(
        f"[bold green]merged[/] {out}: max |Δlogit| {parity.max_abs_diff:.3g} ≤ "
        f"{parity.tolerance:.3g} over {parity.tokens} tokens (adapter effect "
        f"{parity.adapter_effect:.3g})"
    )
    return manifest
