"""Make a tiny Llama-shaped model that real vLLM can serve on a CPU, with nothing downloaded.

    .venv-vllm/bin/python scripts/make_tiny_model.py OUT_DIR [--hidden 1024] [--layers 8]

Random weights (seeded: the same model every time), a byte-level BPE tokenizer trained here
on this repository's own docs, and a chat template. Its text is gibberish, but it is a real
model to a real engine: prefill, decode, sampling, stop conditions, the KV cache and the
OpenAI routes all run for real, which is what the failover tests need. Sized so that a
300-token stream takes seconds on two cores (about 16 ms a token at hidden 1024, 8 layers,
float32), long enough to kill an engine in the middle of it.

Runs in the vLLM virtual environment (it needs torch, transformers and tokenizers), never in
the project's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def corpus(root: Path) -> list[str]:
    texts = [p.read_text(errors="replace") for p in sorted(root.glob("docs/*.md"))]
    texts.append((root / "README.md").read_text(errors="replace"))
    return [line for t in texts for line in t.splitlines() if line.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    ns = p.parse_args()

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = Path(__file__).resolve().parents[1]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=ns.vocab,
        special_tokens=["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(root), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE

    torch.manual_seed(ns.seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=ns.hidden,
        intermediate_size=ns.hidden * 2,
        num_hidden_layers=ns.layers,
        num_attention_heads=max(1, ns.hidden // 128),
        num_key_value_heads=max(1, ns.hidden // 128),
        max_position_embeddings=4096,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    ns.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(ns.out, safe_serialization=True)
    fast.save_pretrained(ns.out)
    (ns.out / "made-by.json").write_text(
        json.dumps({"script": "scripts/make_tiny_model.py", **vars(ns), "out": str(ns.out)}) + "\n"
    )
    print(f"tiny model in {ns.out}: hidden {ns.hidden}, {ns.layers} layers, vocab {len(fast)}")


if __name__ == "__main__":
    main()
