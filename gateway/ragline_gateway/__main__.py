"""`python -m ragline_gateway` serves the gateway with settings from the environment."""

from ragline_common.service import serve
from ragline_gateway.app import build_app
from ragline_gateway.settings import GatewaySettings


def main() -> None:
    settings = GatewaySettings()
    serve(build_app(settings), service="gateway", settings=settings)


if __name__ == "__main__":
    main()
