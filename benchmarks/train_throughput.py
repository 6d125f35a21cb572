"""Training throughput: the seed's LoRA setup vs ctloop's trainer, side by side in one run.

    OMP_NUM_THREADS=1 python benchmarks/train_throughput.py [--tokens 40000] [--repeats 3]

    # on a GPU: the 1.1B Llama shape (TinyLlama's dimensions), bigger token budgets
    python benchmarks/train_throughput.py --shape 1b --tokens 250000 \
        --configs seed ctloop-auto-16384 ctloop-auto-65536 ctloop-auto-16384-sdpa

Same model (a Llama-shaped causal LM, random init, built from config: ~30M parameters, or with
`--shape 1b` the 1.1B shape with the data's 8k-token vocabulary), same data (real Debian package
descriptions, variable lengths), same number of real training tokens. Runs on the GPU when there
is one (the seed through HF Trainer, ctloop's trainer on its own), else on one CPU thread.

- seed: HF Trainer + peft, fp32, batch 4 samples padded to the longest, LoRA r=8 alpha=32 on
  q/v with dropout 0.1, loss on every token (DataCollatorForLanguageModeling);
- ctloop: `ctloop.training.trainer.train_adapter` with its defaults (token-budget batches of fixed-width packed
  rows, LoRA on all linear layers with the fused forward, dropout 0, logits and loss on completions
  only, chunked cross-entropy; on CPU its attention and fused RMSNorm and rotary), forced to fp32,
  and with its `precision: auto` (bf16 on CPUs with AMX); variants: its CPU default attention
  kernel (`-eager`: transformers' eager; `-sdpa`; `-flex`: flex attention, for GPUs), activation
  checkpointing (`-gc`), and length-grouped padded batches instead of packing (`-grouped`). The
  number after the precision is `train.batch_tokens`.

Each configuration runs in its own subprocess, so its peak memory (max RSS, taken when training
ends, before the evaluation; on a GPU, the peak of allocated GPU memory) is its own. Reported:
real (non-pad) tokens/s, peak memory, and the mean completion-token loss on a held-out set after
training (`--eval-rows 0` skips it). On a GPU each configuration first trains untimed on other rows
(compilation, cuBLAS warm-up), and the model FLOP utilisation is printed: 4N FLOPs per real token
against the GPU's bf16 matmul rate measured in the same run. Reads the records file named by CTLOOP_BENCH_DATA (the published figures used a list of
about 20,000 real Debian package descriptions, one JSON object per line with `package` and
`description`) when set, else the quickstart samples.
Figures are printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHARED = Path(os.environ.get("CTLOOP_BENCH_DATA", "/nonexistent"))  # a large package-description list
QUICKSTART = Path(__file__).resolve().parents[1] / "src" / "ctloop" / "quickstart"


def load_rows(limit: int, max_packages: int) -> tuple[list[dict], str]:
    """Rows asking for 1..max_packages package descriptions at once: real text whose lengths vary
    like chat data (a handful to a few hundred tokens), not one fixed short shape."""
    if SHARED.is_file():
        raw = [json.loads(line) for line in SHARED.read_text().splitlines()]
        rng = random.Random(0)
        rng.shuffle(raw)
        rows, i = [], 0
        while len(rows) < limit and i < len(raw):
            group = raw[i : i + rng.randint(1, max_packages)]
            i += len(group)
            rows.append(
                {
                    "prompt": "Describe the Debian packages " + ", ".join(r["package"] for r in group) + ":",
                    "completion": "".join(f" {r['package']}: {r['description']}." for r in group),
                }
            )
        return rows, f"{SHARED} (1-{max_packages} packages per row)"
    rows = []
    for name in ("old_domain.jsonl", "new_domain.jsonl", "pretrain.jsonl"):
        for line in (QUICKSTART / name).read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # the quickstart data carries a few malformed rows on purpose
                continue
            if (
                isinstance(row, dict)
                and isinstance(row.get("prompt"), str)
                and isinstance(row.get("completion"), str)
                and row["completion"].strip()
            ):
                rows.append(row)
    print("note: CTLOOP_BENCH_DATA names no file; using the quickstart samples (short rows)", file=sys.stderr)
    return rows[:limit], "quickstart samples"


SHAPES = {  # Llama shapes; 1b is the H100 baseline's (TinyLlama 1.1B dimensions)
    "30m": dict(
        hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8
    ),
    "1b": dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4
    ),
}


def model_folder(work: Path, shape: str) -> Path:
    return work / f"model-{shape}"


def build_model(folder: Path, rows: list[dict], shape: str) -> None:
    """A Llama-shaped model with a BPE tokenizer trained on the data; no pre-training."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ctloop.training.tinymodel import _train_tokenizer

    torch.manual_seed(0)
    tokenizer = _train_tokenizer([r["prompt"] + r["completion"] for r in rows], 8000)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        **SHAPES[shape],
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def take_tokens(rows: list[dict], tokenizer, budget: int) -> list[dict]:
    """The first rows whose real tokens (<s> prompt completion </s>) add up to `budget`."""
    out, total = [], 0
    for row in rows:
        n = len(tokenizer(row["prompt"] + row["completion"], add_special_tokens=False)["input_ids"]) + 2
        if total + n > budget:
            break
        out.append(row)
        total += n
    return out


def run_seed(model_dir: Path, rows: list[dict]) -> dict:
    """The seed's script, as written there, with the data it implies."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [tokenizer.bos_token + r["prompt"] + r["completion"] + tokenizer.eos_token for r in rows]
    dataset = [{"input_ids": tokenizer(t, add_special_tokens=False)["input_ids"]} for t in texts]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(
        model, LoraConfig(task_type=TaskType.CAUSAL_LM, inference_mode=False, r=8, lora_alpha=32, lora_dropout=0.1)
    )
    args = TrainingArguments(
        output_dir=str(model_dir.parent / "seed-out"),
        num_train_epochs=1,
        per_device_train_batch_size=4,
        learning_rate=2e-4,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    real = sum(len(d["input_ids"]) for d in dataset)
    out = model_dir.parent / "seed-adapter"
    model.save_pretrained(out)
    return {"seconds": seconds, "real_tokens": real, "adapter": str(out)}


def run_ctloop(
    model_dir: Path,
    rows: list[dict],
    precision: str,
    batch_tokens: int,
    attn: str | None,
    checkpointing: bool,
    packing: bool,
) -> dict:
    from ctloop.config import LoraConfig, ModelConfig, TrainConfig
    from ctloop.data.records import record_from_fields
    from ctloop.training.trainer import train_adapter

    records = [record_from_fields(r) for r in rows]
    out = model_dir.parent / f"ctloop-adapter-{precision}-{batch_tokens}-{attn}-{checkpointing}-{packing}"
    result = train_adapter(
        records,
        model=ModelConfig(base=str(model_dir), max_seq_tokens=1024, attn_implementation=attn),
        lora=LoraConfig(),
        train=TrainConfig(
            epochs=1,
            learning_rate=1e-3,
            batch_tokens=batch_tokens,
            checkpoint_every=0,
            precision=precision,
            activation_checkpointing=checkpointing,
            packing=packing,
        ),
        out_dir=out,
    )
    return {"seconds": result.seconds, "real_tokens": result.tokens, "adapter": str(out)}


def eval_loss(model_dir: Path, adapter: str, rows: list[dict]) -> float:
    """Mean completion-token loss of base + adapter on held-out rows (fp32)."""
    from ctloop.config import EvalConfig, ModelConfig
    from ctloop.data.records import record_from_fields
    from ctloop.evaluation.evaluate import evaluate

    report = evaluate(
        {"heldout": [record_from_fields(r) for r in rows]},
        {"adapter": Path(adapter)},
        model=ModelConfig(base=str(model_dir), max_seq_tokens=256),
        config=EvalConfig(),
    )
    return report.mean("heldout", "adapter")


def matmul_parameters(model_dir: Path) -> int:
    """N of the 4N-FLOPs-per-token convention: the weights every token is multiplied by (the layers
    and the output head, tied or not), not the embedding lookup."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    head_dim = c.hidden_size // c.num_attention_heads
    attention = 2 * c.hidden_size**2 + 2 * c.hidden_size * c.num_key_value_heads * head_dim
    per_layer = attention + 3 * c.hidden_size * c.intermediate_size
    return c.num_hidden_layers * per_layer + c.hidden_size * c.vocab_size


def matmul_ceiling() -> float:
    """FLOP/s of a bf16 8192^3 matrix product on this GPU (mean of 10 after 3 warm-ups)."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - started)


def mfu(runs: list[dict], ceiling: float) -> float:
    return statistics.median(4 * r["matmul_parameters"] * r["rate"] for r in runs) / ceiling


def child(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    work = Path(args.work)
    model_dir = model_folder(work, args.shape)
    rows = json.loads((work / "rows.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train_rows = take_tokens(rows["train"], tokenizer, args.tokens)
    name = args.child
    warmup_tokens = args.warmup_tokens
    if name == "seed":

        def run(some_rows):
            return run_seed(model_dir, some_rows)

    else:
        parts = name.split("-")  # ctloop-<precision>-<batch tokens>[-eager|-sdpa|-flex][-gc][-grouped]
        attn = next(
            (
                kernel
                for tag, kernel in (("eager", "eager"), ("sdpa", "sdpa"), ("flex", "flex_attention"))
                if tag in parts
            ),
            None,
        )

        def run(some_rows):
            return run_ctloop(
                model_dir, some_rows, parts[1], int(parts[2]), attn, "gc" in parts, "grouped" not in parts
            )

        # at least two batches and a short last one: flex attention compiles once per batch shape
        warmup_tokens = max(warmup_tokens, int(2.5 * int(parts[2]))) if warmup_tokens else 0

    gpu = torch.cuda.is_available()
    warmup_seconds = 0.0
    if gpu and warmup_tokens:
        # A GPU's first steps compile kernels (flex attention, the block mask) and warm cuBLAS: a short
        # training on other rows first, in the same process, so the timed run is the steady state
        # (as the baseline harness times after its warm-up steps)
        warm_rows = take_tokens(rows["train"][len(train_rows) :], tokenizer, warmup_tokens)
        warmup_seconds = run(warm_rows)["seconds"]
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    out = run(train_rows)
    out["warmup_seconds"] = warmup_seconds
    out["peak_rss_gb"] = (
        torch.cuda.max_memory_allocated() / 2**30
        if gpu  # training only
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )
    out["matmul_parameters"] = matmul_parameters(model_dir)
    eval_rows = rows["eval"][: args.eval_rows]
    out["eval_loss"] = eval_loss(model_dir, out["adapter"], eval_rows) if eval_rows else float("nan")
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=40000, help="real training tokens per configuration")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="30m")
    parser.add_argument("--work", default="/tmp/ctloop-train-throughput")
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["seed", "ctloop-fp32-1024", "ctloop-auto-1024", "ctloop-auto-1024-gc", "ctloop-auto-1024-grouped"],
    )
    parser.add_argument("--max-packages", type=int, default=8, help="1 = one short description per row")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds over all configurations (this machine is noisy: 3 rounds give a median)",
    )
    parser.add_argument(
        "--warmup-tokens",
        type=int,
        default=20000,
        help="on a GPU, each configuration first trains on this many other tokens (ctloop's: at least 2.5 "
        "batches), untimed (0: none)",
    )
    parser.add_argument("--eval-rows", type=int, default=500, help="held-out rows for the eval loss (0: none)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows, source = load_rows(6000, args.max_packages)
    (work / "rows.json").write_text(json.dumps({"train": rows[:-500], "eval": rows[-500:]}))
    if not (model_folder(work, args.shape) / "config.json").is_file():
        build_model(model_folder(work, args.shape), rows, args.shape)
    runs: dict[str, list[dict]] = {name: [] for name in args.configs}
    for round_ in range(args.repeats):  # rounds alternate the configurations, so drift hits them alike
        for name in args.configs:
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    name,
                    "--work",
                    str(work),
                    "--tokens",
                    str(args.tokens),
                    "--shape",
                    args.shape,
                    "--warmup-tokens",
                    str(args.warmup_tokens),
                    "--eval-rows",
                    str(args.eval_rows),
                ],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                continue
            run = json.loads(proc.stdout.strip().splitlines()[-1])
            run["rate"] = run["real_tokens"] / run["seconds"]
            run["round"] = round_
            runs[name].append(run)
            print(f"round {round_ + 1}", name, run, flush=True)

    import torch

    gpu = torch.cuda.is_available()
    where = torch.cuda.get_device_name() if gpu else "1 CPU thread"
    ceiling = matmul_ceiling() if gpu else 0.0
    print(
        f"\ndata: {source}; {args.tokens} real training tokens per configuration; {args.shape} Llama shape; "
        f"{where}; {args.repeats} round(s), medians; peak memory: {'GPU' if gpu else 'RSS'}"
    )
    if gpu:
        print(
            f"timed after an untimed warm-up on other rows ({args.warmup_tokens} tokens, ctloop's at least 2.5 "
            f"batches; compilation happens there); MFU: 4N FLOPs per real token against this GPU's measured bf16 matmul "
            f"ceiling of {ceiling / 1e12:.0f} TFLOP/s (N: the layers' and the head's weights; attention "
            "not counted)"
        )
    print(
        f"{'configuration':26s} {'tokens/s':>9s} {'x seed':>7s} {'per round':>16s} {'peak mem GB':>12s} "
        f"{'eval loss':>10s}" + (f" {'MFU':>6s}" if gpu else "")
    )
    seed_rates = {run["round"]: run["rate"] for run in runs.get("seed", [])}
    for name, done in runs.items():
        if not done:
            continue
        # the ratio pairs each run with the seed's run of the same round (a failed run pairs with none)
        ratios = [r["rate"] / seed_rates[r["round"]] for r in done if r["round"] in seed_rates]
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios else "-"
        ratio = statistics.median(ratios) if ratios else float("nan")
        print(
            f"{name:26s} {statistics.median(r['rate'] for r in done):9.0f} {ratio:7.2f} {spread:>16s} "
            f"{statistics.median(r['peak_rss_gb'] for r in done):12.2f} "
            f"{statistics.median(r['eval_loss'] for r in done):10.3f}" + (f" {mfu(done, ceiling):5.1%}" if gpu else "")
        )
    print(
        "eval loss compares ctloop's configurations with each other only: the seed trains with another learning "
        "rate, other target modules (q/v) and a loss on every token, so its loss is not comparable"
    )
    if not torch.cuda.is_available():
        cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        print(
            f"CPU AMX: {'yes' if 'amx_bf16' in cpuinfo else 'no'} (on a CPU, precision auto trains in bf16 only "
            "with AMX; without it, auto is fp32 like -fp32)"
        )


if __name__ == "__main__":
    main()
