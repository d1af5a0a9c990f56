"""`python -m ragline_gateway` serves the gateway with settings from the environment."""

from ragline_common.service import serve
from ragline_gateway.app import build_app
from ragline_gateway.settings import GatewaySettings


def main() -> None:
    settings = GatewaySettings()
    serve(build_app(settings), service="gateway", host=settings.host, port=settings.port,
          log_level=settings.log_level)  # fmt: skip


if __name__ == "__main__":
    main()
