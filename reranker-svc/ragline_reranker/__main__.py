"""`python -m ragline_reranker`: serve reranker-svc with the settings from the environment."""

from __future__ import annotations

from ragline_common.service import serve
from ragline_reranker.app import build_app
from ragline_reranker.settings import RerankerSettings


def main() -> None:
    settings = RerankerSettings()
    serve(build_app(settings), service="reranker-svc", settings=settings)


if __name__ == "__main__":
    main()
