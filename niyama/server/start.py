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
