import logging

import pytest
from starlette.testclient import TestClient

from mlx_lora_api import cli
from mlx_lora_api.config import redacted
from mlx_lora_api.web.app import create_app

KEY = "k3y-that-must-never-leak-7a1b"
SEED = {"base_model": "default", "training_data": ["x"], "parameters": {"learning_rate": 0.001, "epochs": 1}}


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings), base_url="http://127.0.0.1:8000") as client:
        yield client


@pytest.fixture
def keyed(settings):
    settings.api_key = KEY
    with TestClient(create_app(settings), base_url="http://127.0.0.1:8000") as client:
        yield client


def test_requests_from_other_web_origins_are_refused(client, data_dir):
    r = client.post("/lora-finetune", json=SEED, headers={"Origin": "https://evil.example"})
    assert r.status_code == 403 and "evil.example" in r.json()["message"]
    assert client.get("/jobs").json()["jobs"] == []
    assert "access-control-allow-origin" not in {k.lower() for k in r.headers}
    ok = client.get("/health", headers={"Origin": "http://127.0.0.1:8000"})
    assert ok.status_code == 200 and "access-control-allow-origin" not in {k.lower() for k in ok.headers}


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_bodies_a_browser_could_send_cross_site_are_refused(client, content_type):
    r = client.post(
        "/lora-finetune",
        content=b'{"base_model": "default", "training_data": ["x"]}',
        headers={"Content-Type": content_type},
    )
    assert r.status_code == 415
    assert client.get("/jobs").json()["jobs"] == []


def test_the_one_form_upload_is_refused_from_other_sites(client):
    """POST /v1/files is multipart by OpenAI's definition: allowed from a script or the service's
    own page, refused when a browser says another site sent it."""
    files = {"file": ("t.jsonl", b'{"text": "a"}\n')}
    own = client.post(
        "/v1/files", files=files, data={"purpose": "fine-tune"}, headers={"Sec-Fetch-Site": "same-origin"}
    )
    assert own.status_code == 200 and own.json()["object"] == "file"
    for headers in (
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Origin": "https://evil.example"},
    ):
        r = client.post("/v1/files", files=files, data={"purpose": "fine-tune"}, headers=headers)
        assert r.status_code == 403, headers
    assert [f["id"] for f in client.get("/v1/files").json()["data"]] == [own.json()["id"]]


def test_dns_rebinding_host_names_are_refused(client):
    r = client.get("/models", headers={"Host": "attacker.example:8000"})
    assert r.status_code == 403 and "not a loopback name" in r.json()["message"]
    assert client.get("/models", headers={"Host": "localhost:8000"}).status_code == 200


def test_an_api_key_is_required_when_configured_and_never_echoed(keyed, caplog):
    caplog.set_level(logging.DEBUG)
    assert keyed.get("/health").status_code == 200
    r = keyed.get("/models")
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    wrong = keyed.get("/models", headers={"Authorization": f"Bearer {KEY}x"})
    assert wrong.status_code == 401 and KEY not in wrong.text
    right = keyed.get("/models", headers={"Authorization": f"Bearer {KEY}"})
    assert right.status_code == 200
    settings = keyed.app.state.settings
    assert settings.api_key == KEY  # the secret is there to leak
    everything = wrong.text + right.text + str(settings) + repr(settings) + str(redacted(settings)) + caplog.text
    assert KEY not in everything


def test_serve_binds_beyond_loopback_only_with_a_key(data_dir, monkeypatch):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--host", "0.0.0.0", "--data-dir", str(data_dir)])
    assert exit_info.value.code == 2
    started = []
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: started.append(kw))
    monkeypatch.setenv("MLX_LORA_API_API_KEY", KEY)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--host", "0.0.0.0", "--data-dir", str(data_dir)])
    assert exit_info.value.code == 0 and started[0]["host"] == "0.0.0.0"
