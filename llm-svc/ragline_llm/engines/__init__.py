"""Generation engines behind one interface (`base.Engine`)."""

from __future__ import annotations

from ragline_llm.engines.base import Engine
from ragline_llm.settings import LlmSettings


def build_engine(settings: LlmSettings) -> Engine:
    if settings.engine == "vllm":
        from ragline_llm.engines.vllm_engine import VllmEngine

        return VllmEngine(settings)
    if settings.engine == "fixed":
        from ragline_llm.engines.fixed import FixedEngine

        return FixedEngine(settings.model_name, settings.fixed_tokens, settings.token_interval_ms)
    from ragline_llm.engines.extractive import ExtractiveEngine

    return ExtractiveEngine(
        model_name=settings.model_name, token_interval_ms=settings.token_interval_ms
    )
