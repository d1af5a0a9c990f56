"""Small cross-encoders with RANDOM weights, built locally: for tests and benchmarks only.

No cross-encoder weights are available offline, yet the batching, truncation and scoring
code must run on a real `CrossEncoder`. These checkpoints are real in every respect but
their training: a saved `BertForSequenceClassification` with the packaged
all-MiniLM-L6-v2 tokenizer. Their scores are noise; never report ranking quality from
them. Because the head is saved, the scorer's untrained-head guard lets them load: that
guard catches a head that is *missing* from a checkpoint, not one that was never trained.
"""

from __future__ import annotations

from pathlib import Path


def build_tiny_cross_encoder(
    path: Path, *, seed: int = 0, layers: int = 2, hidden: int = 64
) -> Path:
    """A 2-layer, 64-wide BERT cross-encoder (about 2 M parameters) saved at `path`.

    `initializer_range` is wide so that different pairs get clearly different scores,
    which the tests need to see a scrambled order.
    """
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from ragline_reranker.scorers import packaged_bi_encoder_path

    tokenizer = AutoTokenizer.from_pretrained(packaged_bi_encoder_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 32),
        intermediate_size=hidden * 2,
        max_position_embeddings=512,
        num_labels=1,
        initializer_range=0.3,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_minilm_cross_encoder(path: Path, *, seed: int = 0) -> Path:
    """all-MiniLM-L6-v2's encoder with a fresh, random classification head, saved.

    Real-sized (6 layers, 384 wide, 22 M parameters): as slow as a small production
    reranker, for benchmarks and for tests that need a forward pass to take a while.
    """
    import torch
    from sentence_transformers import CrossEncoder

    from ragline_reranker.scorers import packaged_bi_encoder_path

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CrossEncoder(
            packaged_bi_encoder_path(), num_labels=1, local_files_only=True, device="cpu"
        )
    model.save(str(path))
    return path
