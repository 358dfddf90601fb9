"""Train portable's embedded default model: a small Llama (grouped-query attention) on the Python standard library.

Two stages, both seeded and deterministic for a given interpreter:

    python training/train_default_model.py prepare --work .train          # corpus -> byte-level BPE -> token ids
    python training/train_default_model.py train --work .train --device cuda --out portable/data/default_model

`prepare` reads every ``*.py`` file of the running interpreter's standard library (site-packages excluded), sorted
by path; about 2% of the files (chosen by a hash of their path) are held out for validation. `train` writes a
Hugging Face model folder (config.json, model.safetensors, tokenizer files) and `training_log.json`, keeping the
checkpoint with the lowest held-out loss. It runs on CPU too (slowly); the shipped model was trained on a GPU
(see the model card, portable/data/default_model/README.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

EOS = "<|endoftext|>"
VOCAB_SIZE = 4096


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix()), root


def _is_heldout(relpath: str) -> bool:
    return int(hashlib.sha1(relpath.encode()).hexdigest(), 16) % 100 < 2


def prepare(work: Path) -> None:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    files, root = _stdlib_files()
    train_texts, val_texts = [], []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        rel = path.relative_to(root).as_posix()
        (val_texts if _is_heldout(rel) else train_texts).append(text)
    work.mkdir(parents=True, exist_ok=True)

    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(train_texts, vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=[EOS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS,
                                        pad_token=EOS, unk_token=None, model_max_length=4096)
    tokenizer.save_pretrained(work / "tokenizer")

    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    stats = {"python": sys.version.split()[0], "files": len(files), "heldout_files": len(val_texts)}
    for name, texts in (("train", train_texts), ("val", val_texts)):
        ids: list[int] = []
        for enc in bpe._tokenizer.encode_batch(texts):
            ids.extend(enc.ids)
            ids.append(eos_id)
        np.asarray(ids, dtype=np.uint16).tofile(work / f"{name}.bin")
        stats[f"{name}_tokens"] = len(ids)
        stats[f"{name}_bytes"] = sum(len(t.encode()) for t in texts)
    (work / "prepare.json").write_text(json.dumps(stats, indent=1))
    print(json.dumps(stats))


def _model_config(tokenizer):
    from transformers import LlamaConfig

    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    return LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=256, intermediate_size=512, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
    )


@torch.no_grad()
def _evaluate(model, val: np.ndarray, seq_len: int, device: str, amp: bool) -> float:
    model.eval()
    n = (len(val) - 1) // seq_len
    losses = []
    for start in range(0, n, 16):
        rows = [val[i * seq_len:(i + 1) * seq_len + 1] for i in range(start, min(n, start + 16))]
        batch = torch.from_numpy(np.stack(rows).astype(np.int64)).to(device)
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=amp):
            logits = model(input_ids=batch[:, :-1]).logits
        losses.append(torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum").item())
    model.train()
    return sum(losses) / (n * seq_len)


def train(work: Path, out: Path, device: str, steps: int, batch: int, seq_len: int, lr: float, seed: int,
          eval_every: int, max_minutes: float) -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(work / "tokenizer")
    model = LlamaForCausalLM(_model_config(tokenizer)).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    train_ids = np.fromfile(work / "train.bin", dtype=np.uint16)
    val_ids = np.fromfile(work / "val.bin", dtype=np.uint16)
    rng = np.random.default_rng(seed)
    amp = device.startswith("cuda")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), fused=amp)
    warmup = max(1, steps // 50)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    log = {"params": n_params, "steps": steps, "batch": batch, "seq_len": seq_len, "lr": lr, "seed": seed,
           "device": torch.cuda.get_device_name() if amp else "cpu", "torch": torch.__version__, "evals": []}
    best = (float("inf"), -1)
    best_state = None
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        starts = rng.integers(0, len(train_ids) - seq_len - 1, size=batch)
        rows = np.stack([train_ids[s:s + seq_len + 1] for s in starts]).astype(np.int64)
        x = torch.from_numpy(rows).to(device, non_blocking=True)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=amp):
            logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        last = step == steps - 1
        out_of_time = (time.perf_counter() - t0) / 60 > max_minutes
        if (step + 1) % eval_every == 0 or last or out_of_time:
            val = _evaluate(model, val_ids, seq_len, device, amp)
            entry = {"step": step + 1, "train_loss": round(loss.item(), 4), "val_loss": round(val, 4),
                     "minutes": round((time.perf_counter() - t0) / 60, 2)}
            log["evals"].append(entry)
            print(json.dumps(entry), flush=True)
            if val < best[0]:
                best = (val, step + 1)
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        if out_of_time:
            log["stopped_early_at"] = step + 1
            break
    model.load_state_dict(best_state)
    log["best_val_loss"], log["best_step"] = round(best[0], 4), best[1]
    val_bytes = json.loads((work / "prepare.json").read_text())["val_bytes"]
    log["best_val_bits_per_byte"] = round(best[0] * len(val_ids) / val_bytes / math.log(2), 4)
    log["prepare"] = json.loads((work / "prepare.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    model.to("cpu").float().save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "training_log.json").write_text(json.dumps(log, indent=1))
    print(json.dumps({k: v for k, v in log.items() if k != "evals"}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--work", type=Path, default=Path(".train"))
    t = sub.add_parser("train")
    t.add_argument("--work", type=Path, default=Path(".train"))
    t.add_argument("--out", type=Path, default=Path("portable/data/default_model"))
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--steps", type=int, default=12000)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--seq-len", type=int, default=512)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--eval-every", type=int, default=500)
    t.add_argument("--max-minutes", type=float, default=float("inf"),
                   help="stop early (keeping the best checkpoint so far) after this many minutes")
    args = parser.parse_args()
    if args.stage == "prepare":
        prepare(args.work)
    else:
        train(args.work, args.out, args.device, args.steps, args.batch, args.seq_len, args.lr, args.seed,
              args.eval_every, args.max_minutes)


if __name__ == "__main__":
    main()
