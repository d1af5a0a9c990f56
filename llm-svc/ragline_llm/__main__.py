"""`python -m ragline_llm`: serve llm-svc with the settings from the environment."""

from __future__ import annotations

from ragline_common.service import serve
from ragline_llm.app import build_app
from ragline_llm.settings import LlmSettings


def main() -> None:
    settings = LlmSettings()
    serve(build_app(settings), service="llm-svc", settings=settings)


if __name__ == "__main__":  # vLLM's engine process re-imports the main module
    main()
