"""`python -m ragline_gateway` serves the gateway with settings from the environment."""

from ragline_common.logs import configure_logging
from ragline_common.middleware import StreamAfterChain
from ragline_common.service import serve
from ragline_gateway.app import build_app
from ragline_gateway.hardening import HeaderLimitedProtocol
from ragline_gateway.settings import GatewaySettings


def main() -> None:
    settings = GatewaySettings()
    configure_logging("gateway", settings.log_level)  # so key loading logs as JSON too
    try:
        app = build_app(settings)
    except ValueError as exc:  # no keys, or a keys file that does not validate
        raise SystemExit(f"gateway not started: {exc}") from None
    # uvicorn's HTTP protocol with bounded request heads (431 past the limits).
    protocol = HeaderLimitedProtocol.configured(
        settings.max_header_bytes, settings.max_header_count
    )
    # X-Forwarded-For names the client only when the peer is a trusted proxy (auth.py).
    # Answers stream after the middleware chain has returned (less memory per open one).
    serve(
        app,
        service="gateway",
        settings=settings,
        outer=StreamAfterChain,
        http=protocol,
        forwarded_allow_ips=settings.trusted_proxies,
    )


if __name__ == "__main__":
    main()
