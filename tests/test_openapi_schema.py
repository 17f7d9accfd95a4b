"""/openapi.json describes the API the server answers: request bodies (JSON and multipart), every
status, enums, links, Allow. The document's shape is read in process (no workers); schemathesis
then tries it against a real `wan-rt serve` on 127.0.0.1, bounded in examples and time."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from wan_rt.service.http import create_app
from wan_rt.service.service import VideoService

SCHEMATHESIS_TIMEOUT_S = 300


def _app(tmp_path: Path, model: str = "tiny-t2v-A14B", **kwargs):
    """The app without starting the service: the document and the routing checks need no worker."""
    return create_app(VideoService(model, data_dir=tmp_path / "data"), **kwargs)


@pytest.fixture(scope="module")
def document(tmp_path_factory) -> dict:
    return _app(tmp_path_factory.mktemp("openapi")).openapi()


def test_every_post_has_a_json_and_a_multipart_body(document):
    posts = {path: item["post"] for path, item in document["paths"].items() if "post" in item}
    assert set(posts) == {"/v1/videos", "/v1/videos/{video_id}/remix", "/v1/videos/edits"}  # T2V: no extensions
    for path, op in posts.items():
        content = op["requestBody"]["content"]
        assert set(content) == {"application/json", "multipart/form-data"}, path
        json_body, form = content["application/json"]["schema"], content["multipart/form-data"]["schema"]
        assert json_body["additionalProperties"] is False and "prompt" in json_body["required"], path
        assert json_body["properties"]["prompt"]["minLength"] == 1
        assert set(form["properties"]) == set(json_body["properties"]), path
    create = posts["/v1/videos"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert "input_reference" not in create  # a text-to-video model takes no image
    edit = posts["/v1/videos/edits"]["requestBody"]["content"]
    assert edit["multipart/form-data"]["schema"]["properties"]["video"] == {
        "type": "string", "format": "binary", "description": edit["application/json"]["schema"]["properties"]
        ["video"]["description"]}
    assert edit["multipart/form-data"]["encoding"] == {"video": {"contentType": "video/mp4"}}


def test_fixed_values_are_enums_and_limits_are_bounds(document):
    create = document["paths"]["/v1/videos"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    props = create["properties"]
    assert props["num_frames"]["anyOf"][0]["enum"] == [1, 5, 9]
    assert props["model"]["anyOf"][0]["const"] == "tiny-t2v-A14B"
    assert props["size"]["anyOf"][0]["pattern"] == "^(16|32|48|64)x(16|32|48|64)$"
    assert props["seconds"]["anyOf"][0]["enum"] == ["0.0625", "0.3125", "0.5625"]
    steps = props["num_inference_steps"]["anyOf"][0]
    assert (steps["minimum"], steps["maximum"]) == (1, 1000)
    schemas = document["components"]["schemas"]
    assert schemas["Solver"]["enum"] == ["unipc", "dpm++", "euler"]
    assert schemas["Video"]["properties"]["status"]["$ref"] == "#/components/schemas/Status"
    content = document["paths"]["/v1/videos/{video_id}/content"]["get"]
    variant = next(p for p in content["parameters"] if p["name"] == "variant")
    assert schemas[variant["schema"]["$ref"].split("/")[-1]]["enum"] == ["video", "thumbnail", "spritesheet"]
    assert set(content["responses"]["200"]["content"]) == {"video/mp4", "image/webp", "image/jpeg"}


def test_every_status_is_documented_and_422_is_not(document):
    statuses = {(method.upper(), path): set(op["responses"]) for path, item in document["paths"].items()
                for method, op in item.items()}
    # 503: the model cannot load here (the workers gave up) or the storage (a bucket) failed
    assert statuses[("POST", "/v1/videos")] == {"200", "400", "413", "429", "503"}
    assert statuses[("POST", "/v1/videos/{video_id}/remix")] == {"200", "400", "404", "409", "413", "429", "503"}
    assert statuses[("GET", "/v1/videos/{video_id}/content")] == {"200", "307", "400", "404", "409", "503"}
    assert statuses[("DELETE", "/v1/videos/{video_id}")] == {"200", "404", "503"}
    assert statuses[("GET", "/readyz")] == {"200", "503"}
    assert statuses[("GET", "/healthz")] == {"200", "503"}
    assert all("422" not in codes for codes in statuses.values())
    assert "HTTPValidationError" not in document["components"]["schemas"]
    metrics = document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert set(metrics) == {"text/plain"}


def test_links_lead_from_create_to_retrieve_content_and_delete(document):
    links = document["paths"]["/v1/videos"]["post"]["responses"]["200"]["links"]
    targets = {link["operationId"] for link in links.values()}
    assert {"retrieve_video", "download_content", "delete_video", "remix_video"} <= targets
    assert all(link["parameters"] == {"video_id": "$response.body#/id"} for link in links.values())


def test_models_with_an_image_take_input_reference_and_extend(tmp_path):
    document = _app(tmp_path, "tiny-i2v-A14B", api_key="k").openapi()
    create = document["paths"]["/v1/videos"]["post"]["requestBody"]["content"]
    assert "input_reference" in create["application/json"]["schema"]["required"]
    assert create["multipart/form-data"]["schema"]["properties"]["input_reference"]["format"] == "binary"
    extend = document["paths"]["/v1/videos/extensions"]["post"]
    assert extend["requestBody"]["content"]["application/json"]["schema"]["required"] == ["prompt", "video"]
    assert extend["security"] == [{"bearer": []}] and "401" in extend["responses"]
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_allow_lists_the_methods_of_the_path(tmp_path):
    from fastapi.testclient import TestClient

    client = TestClient(_app(tmp_path))
    for method, path, allowed in (("OPTIONS", "/v1/videos", "GET, POST"), ("PUT", "/v1/videos/x", "DELETE, GET"),
                                  ("GET", "/v1/videos/edits", "POST"), ("GET", "/v1/videos/extensions", "POST"),
                                  ("HEAD", "/healthz", "GET")):
        response = client.request(method, path)
        assert (response.status_code, response.headers["allow"]) == (405, allowed), (method, path)
    refused = client.post("/v1/videos/extensions", json={"prompt": "x", "video": {"id": "v"}})
    assert refused.status_code == 400 and refused.json()["error"]["message"] == (
        "tiny-t2v-A14B is a text-to-video model and cannot extend a video: extension continues from the last "
        "frame, which needs an image-conditioned model (i2v, ti2v)")


@pytest.mark.slow
def test_schemathesis_finds_nothing(tmp_path, serve_helpers):
    """`schemathesis run --checks all` (every phase, stateful included) against `wan-rt serve`:
    0 failures. Bounded: 3 examples per operation, 60 s (fuzzing and stateful runs fill it), a fixed
    seed, one worker, a hard timeout.
    tests/schemathesis_hooks.py makes its uploads real mp4s (a schema cannot say "decodable")."""
    pytest.importorskip("schemathesis")
    server = serve_helpers.Server(tmp_path / "data").start()
    try:
        env = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks", "PYTHONPATH": str(Path(__file__).parent),
               "NO_COLOR": "1"}
        run = subprocess.run([sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json",
                              "--checks", "all", "--max-examples", "3", "--max-time", "60", "--seed", "1", "--workers", "1",
                              "--request-timeout", "30"], env=env, capture_output=True, text=True,
                             timeout=SCHEMATHESIS_TIMEOUT_S, cwd=tmp_path)
        report = run.stdout + run.stderr
        assert run.returncode == 0 and re.search(r"No issues found", report), report[-6000:]
        for phase in ("Coverage", "Fuzzing", "Stateful"):
            assert re.search(rf"✅ {phase}", report), report[-3000:]
    finally:
        server.kill()

