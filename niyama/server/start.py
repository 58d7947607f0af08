"""Starting an engine for a server: `niyama serve` (one engine) and each Ray Serve engine replica."""

from __future__ import annotations


def start_engine(config, tiers, in_process: bool):
    """The engine, its model loaded: in its own process (the default), or on a thread of this one."""
    from ..engine.tokenizer import Tokenizer
    from ..qos import DeadlineRule
    from .engine_client import EngineClient

    if in_process:
        from ..engine import LLMEngine

        engine = LLMEngine(config)
        engine.set_tiers(tiers, DeadlineRule())
        return EngineClient.in_thread(engine)

    def tokenizer(info):
        """The engine's tokenizer (its path and EOS ids come from the engine); the chat template from the
        same config the engine got, so both processes render chats alike."""
        if not info["tokenizer_path"]:
            return None
        return Tokenizer(info["tokenizer_path"], info["eos_token_ids"], config.chat_template)

    return EngineClient.spawn(config, tiers, tokenizer_factory=tokenizer)


MAX_HEADER_BYTES = 64 * 2**10     # a request's line and headers; beyond, 400 and the connection closes


def serve_http(app, host: str, port: int, log_level: str, keep_alive_s: float, max_connections: int,
               shutdown_grace_s: float) -> None:
    """Serve `app` with uvicorn until SIGTERM / SIGINT, with its limits: `keep_alive_s` for an idle connection
    (and for a new one to send its first request's head), at most `max_connections` connections (503 beyond),
    request heads of at most MAX_HEADER_BYTES. On the signal it stops accepting, gives the requests in flight
    `shutdown_grace_s` to finish, then ends them with a 503 (app.state.drain)."""
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        """uvicorn's h11 protocol, plus a deadline for a new connection's first request head (uvicorn times
        only the idle time after a response: a connection that never sends a request would stay open)."""

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._head_timer = self.loop.call_later(self.timeout_keep_alive, self._no_request)

        def _no_request(self) -> None:
            if self.cycle is None and not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc) -> None:
            self._head_timer.cancel()
            super().connection_lost(exc)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            app.state.drain(shutdown_grace_s)
            await super().shutdown(sockets)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=Protocol,
                            timeout_keep_alive=keep_alive_s, limit_concurrency=max_connections,
                            h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                            # past the grace the app ends what is left; uvicorn cancels only what still hangs
                            timeout_graceful_shutdown=shutdown_grace_s + 5)
    Server(config).run()
