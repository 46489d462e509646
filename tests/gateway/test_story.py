"""The seed story through the in-process gateway, in front of the real audience and retarget servers."""

from __future__ import annotations

from .story import Client, seed_story


async def test_seed_story_through_gateway(real_stack) -> None:
    gateway = real_stack.gateway
    client = Client(gateway.channel, "alpha", gateway.auth("alpha"), gateway.auth("platform"))
    result = await seed_story(client)
    # The tenant sees noisy counts (differential privacy): persona and pack sizes agree closely.
    assert abs(result.persona.size - result.clickers.size) <= 100
    assert result.redemption.discount_fen == 1000
    assert sum(arm.redeemed for arm in result.report.arms) == 1
