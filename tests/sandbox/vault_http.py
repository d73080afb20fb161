"""A tiny HTTP client for the sandbox tests (the product's VaultClient is tested elsewhere)."""
from __future__ import annotations

import requests

from vault_sandbox.seed import DEMO_PASSWORD, INTEGRATION_USER

API = "v25.2"
NOW = "2026-11-25T12:00:00Z"


class Client:
    """Just enough HTTP to exercise the sandbox; the product's VaultClient is tested elsewhere."""

    def __init__(self, url: str, username: str = INTEGRATION_USER, password: str = DEMO_PASSWORD):
        self.url, self.username, self.password = url, username, password
        self.http = requests.Session()
        self.session_id: str | None = None

    def login(self) -> dict:
        body = self.http.post(f"{self.url}/api/{API}/auth",
                              data={"username": self.username, "password": self.password}, timeout=30).json()
        self.session_id = body.get("sessionId")
        return body

    def request(self, method: str, path: str, **kwargs) -> requests.Response:
        if self.session_id is None:
            self.login()
        headers = {"Authorization": self.session_id, **kwargs.pop("headers", {})}
        kwargs.setdefault("timeout", 30)
        return self.http.request(method, f"{self.url}{path}", headers=headers, **kwargs)

    def query(self, q: str) -> dict:
        return self.request("POST", f"/api/{API}/query", data={"q": q}).json()

    def query_all(self, q: str, method: str = "GET") -> tuple[list[dict], list[dict]]:
        """All rows of a query following next_page; also returns each page's responseDetails."""
        body = self.query(q)
        assert body["responseStatus"] == "SUCCESS", body
        rows, details = list(body["data"]), [body["responseDetails"]]
        while "next_page" in body["responseDetails"]:
            body = self.request(method, body["responseDetails"]["next_page"]).json()
            assert body["responseStatus"] == "SUCCESS", body
            rows += body["data"]
            details.append(body["responseDetails"])
        return rows, details

    def write(self, method: str, object_name: str, records, id_param: str | None = None) -> dict:
        params = {"idParam": id_param} if id_param else None
        return self.request(method, f"/api/{API}/vobjects/{object_name}", json=records, params=params).json()
