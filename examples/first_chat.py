"""A first chat from Python: `.venv/bin/python examples/first_chat.py "$TOKEN" [WS_URL ...]`."""

import asyncio
import sys
import uuid
from typing import Any

import aiohttp

from common.client.fanout import FanoutClient


async def main(token: str, urls: list[str]) -> None:
    api = urls[0].replace("ws", "http", 1).removesuffix("/ws")
    auth = {"Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession(headers=auth) as http,
        http.post(f"{api}/api/v1/sessions", json={"participants": []}) as resp,
    ):
        session_id = (await resp.json())["id"]
    replied = asyncio.Event()

    def on_frame(frame: dict[str, Any]) -> None:
        if frame["type"] == "message":  # every device of the user gets it, this one too
            print(f"{frame['message']['role']}: {frame['message']['content']}")
            if frame["message"]["role"] == "assistant":
                replied.set()

    async with FanoutClient(urls, token, "laptop", on_frame=on_frame) as client:
        chat = {"type": "chat", "id": uuid.uuid4().hex, "session_id": session_id}
        await client.send({**chat, "content": "hello"})
        await asyncio.wait_for(replied.wait(), 10)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2:] or ["ws://127.0.0.1:8080/ws"]))
