"""``/v1/conversations``: the endpoints and their errors."""

from __future__ import annotations

import pytest

from tests.conftest import MODEL, LiveGateway


async def test_create_get_list_add_patch_delete(live: LiveGateway) -> None:
    _, key = await live.developer_key()
    async with live.client(key) as client:
        created = await client.post("/v1/conversations", json={})
        assert created.status_code == 200
        body = created.json()
        assert body["object"] == "conversation" and body["id"].startswith("conv_")
        assert body["title"] is None and body["message_count"] == 0
        conversation_id = body["id"]

        added = await client.post(
            f"/v1/conversations/{conversation_id}/messages",
            json={"role": "user", "content": "Remember: the door code is 4711."},
        )
        assert added.status_code == 200, added.text
        assert added.json()["data"][0]["role"] == "user"
        several = await client.post(
            f"/v1/conversations/{conversation_id}/messages",
            json={
                "messages": [
                    {"role": "assistant", "content": "Noted."},
                    {"role": "user", "content": [{"type": "text", "text": "Thanks"}]},
                ]
            },
        )
        assert several.status_code == 200

        got = (await client.get(f"/v1/conversations/{conversation_id}")).json()
        assert got["message_count"] == 3
        assert [(m["role"], m["content"]) for m in got["messages"]] == [
            ("user", "Remember: the door code is 4711."),
            ("assistant", "Noted."),
            ("user", "Thanks"),
        ]
        assert got["summary"] is None
        newest = (
            await client.get(f"/v1/conversations/{conversation_id}", params={"messages_limit": 1})
        ).json()
        assert [m["content"] for m in newest["messages"]] == ["Thanks"]

        patched = await client.patch(
            f"/v1/conversations/{conversation_id}", json={"title": "Door", "system": "Be brief."}
        )
        assert patched.status_code == 200
        assert patched.json()["title"] == "Door" and patched.json()["system"] == "Be brief."

        deleted = await client.delete(f"/v1/conversations/{conversation_id}")
        assert deleted.json() == {
            "id": conversation_id,
            "object": "conversation.deleted",
            "deleted": True,
        }
        again = await client.get(f"/v1/conversations/{conversation_id}")
        assert again.status_code == 404
        assert again.json()["error"]["code"] == "CONVERSATION_NOT_FOUND"
        assert (await client.delete(f"/v1/conversations/{conversation_id}")).status_code == 404


async def test_create_with_title_system_model_and_history(live: LiveGateway) -> None:
    _, key = await live.developer_key()
    async with live.client(key) as client:
        created = await client.post(
            "/v1/conversations",
            json={
                "title": "Imported",
                "system": "You are a pirate.",
                "model": MODEL,
                "messages": [
                    {"role": "user", "content": "Ahoy"},
                    {"role": "assistant", "content": "Arr"},
                ],
            },
        )
        assert created.status_code == 200, created.text
        body = created.json()
        assert body["title"] == "Imported" and body["message_count"] == 2
        assert body["model"] == MODEL and body["system"] == "You are a pirate."


async def test_pagination_newest_activity_first(live: LiveGateway) -> None:
    _, key = await live.developer_key()
    async with live.client(key) as client:
        ids = [(await client.post("/v1/conversations", json={})).json()["id"] for _ in range(5)]
        # Activity moves the first one to the front.
        await client.post(
            f"/v1/conversations/{ids[0]}/messages", json={"role": "user", "content": "bump"}
        )
        seen: list[str] = []
        after = None
        while True:
            params: dict[str, str | int] = {"limit": 2}
            if after:
                params["after"] = after
            page = (await client.get("/v1/conversations", params=params)).json()
            assert page["object"] == "list" and len(page["data"]) <= 2
            seen += [c["id"] for c in page["data"]]
            if not page["has_more"]:
                break
            after = page["last_id"]
        assert seen[0] == ids[0]
        assert sorted(seen) == sorted(ids) and len(seen) == 5
        bad = await client.get("/v1/conversations", params={"after": "conv_unknown"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "after"
        too_many = await client.get("/v1/conversations", params={"limit": 1000})
        assert too_many.status_code == 400


async def test_another_accounts_conversation_is_not_found(live: LiveGateway) -> None:
    _, key = await live.developer_key("owner")
    _, other = await live.developer_key("other")
    async with live.client(key) as client:
        conversation_id = (await client.post("/v1/conversations", json={})).json()["id"]
    async with live.client(other) as client:
        assert (await client.get(f"/v1/conversations/{conversation_id}")).status_code == 404
        assert (await client.delete(f"/v1/conversations/{conversation_id}")).status_code == 404
        add = await client.post(
            f"/v1/conversations/{conversation_id}/messages", json={"role": "user", "content": "x"}
        )
        assert add.status_code == 404
        patch = await client.patch(f"/v1/conversations/{conversation_id}", json={"title": "x"})
        assert patch.status_code == 404
        assert (await client.get("/v1/conversations")).json()["data"] == []
    async with live.client(key) as client:  # untouched
        got = (await client.get(f"/v1/conversations/{conversation_id}")).json()
        assert got["message_count"] == 0 and got["title"] is None


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "param"),
    [
        ("POST", "/v1/conversations", {"title": 5}, 400, "title"),
        ("POST", "/v1/conversations", {"model": "no-such-model"}, 404, "model"),
        ("POST", "/v1/conversations", {"colour": "red"}, 400, "colour"),
        (
            "POST",
            "/v1/conversations",
            {"messages": [{"role": "system", "content": "x"}]},
            400,
            None,
        ),
        ("POST", "{conv}/messages", {"role": "user"}, 400, "content"),
        ("POST", "{conv}/messages", {"content": "x"}, 400, "role"),
        ("POST", "{conv}/messages", {"role": "tool", "content": "x"}, 400, "role"),
        (
            "POST",
            "{conv}/messages",
            {"role": "user", "content": "x", "messages": [{"role": "user", "content": "y"}]},
            400,
            "messages",
        ),
        ("PATCH", "{conv}", {}, 400, None),
        ("PATCH", "{conv}", {"title": ""}, 400, "title"),
    ],
)
async def test_bad_requests_name_the_field(
    live: LiveGateway,
    method: str,
    path: str,
    body: dict[str, object],
    status: int,
    param: str | None,
) -> None:
    _, key = await live.developer_key()
    async with live.client(key) as client:
        conversation_id = (await client.post("/v1/conversations", json={})).json()["id"]
        url = path.replace("{conv}", f"/v1/conversations/{conversation_id}")
        response = await client.request(method, url, json=body)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["message"]
        if param is not None:
            assert error["param"] is not None and error["param"].startswith(param)
        malformed = await client.request(
            method, url, content=b"{not json", headers={"Content-Type": "application/json"}
        )
        assert malformed.status_code == 400
        got = (await client.get(f"/v1/conversations/{conversation_id}")).json()
        assert got["message_count"] == 0  # nothing half-stored


async def test_without_a_key_it_is_401(live: LiveGateway) -> None:
    async with live.client() as client:
        assert (await client.get("/v1/conversations")).status_code == 401
        assert (await client.post("/v1/conversations", json={})).status_code == 401
