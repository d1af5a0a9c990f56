"""Tiny models built at test time, offline, so the real engines can be tested without any
download: nothing here is fit to judge answer quality (the weights are random).

`build_tiny_llama(out_dir)` writes a Hugging Face Llama directory that vLLM loads:
- a byte-level BPE tokenizer (vocabulary 1024) trained with `tokenizers` on the repo's
  sample documents, with the full byte alphabet so that any text encodes, and `<s>`,
  `</s>`, `<pad>` as special tokens;
- a chat template (saved as `chat_template.jinja`) that ends with an open assistant turn;
- a 2-layer Llama with random weights (seeded, so the same on every build), hidden size
  128 and 2 heads, i.e. head_dim 64: vLLM's CPU attention kernel accepts only some head
  sizes (32, 64, 80, ...; 16 kills the engine on the first request).

It takes about 5 s. Run it in the Python that will load the model (the vLLM venv), so that
the files are written by the same `transformers` that reads them:

    .venv-vllm/bin/python tests/tiny_models.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLES = REPO_ROOT / "samples"

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
LLAMA_VOCAB = 1024
# The longest context the tiny Llama supports (its position embeddings); vLLM's
# max_model_len may be set lower.
LLAMA_MAX_POSITIONS = 4096
LLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def training_texts() -> list[Path]:
    """The repo's sample documents: enough text for a 1024-token BPE vocabulary."""
    files = sorted(p for p in SAMPLES.rglob("*") if p.suffix in {".md", ".txt"})
    if not files:
        raise FileNotFoundError(f"no .md or .txt files under {SAMPLES} to train a tokenizer")
    return files


def build_tiny_llama(out_dir: Path, texts: list[Path] | None = None) -> Path:
    """Write a tiny random-weight Llama with its tokenizer and chat template to `out_dir`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=LLAMA_VOCAB,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(p) for p in texts or training_texts()], trainer)
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=LLAMA_MAX_POSITIONS,
        chat_template=LLAMA_CHAT_TEMPLATE,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_tokenizer.save_pretrained(out_dir)

    config = LlamaConfig(
        vocab_size=len(hf_tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=LLAMA_MAX_POSITIONS,
        bos_token_id=hf_tokenizer.bos_token_id,
        eos_token_id=hf_tokenizer.eos_token_id,
        pad_token_id=hf_tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.bos_token_id = config.bos_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: tiny_models.py OUT_DIR")
    print(build_tiny_llama(Path(sys.argv[1])))
