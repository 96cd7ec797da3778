"""`vlfm serve` through FastAPI's test client: values equal to the model called directly, every limit and error
(always `{"error": {"message", "type"}}`, never a 5xx), the API key, metrics, the micro-batcher."""

import asyncio
import base64
import io
import json
import sys
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from test_vlm import tiny_vlm_config

import vlfm
from vlfm.data.shapes import ShapesWorld, WorldConfig
from vlfm.data.world_text import captions
from vlfm.io import SearchError, UsageError
from vlfm.search import SearchIndex
from vlfm.serve import Limits, create_app
from vlfm.serve.batcher import Batcher
from vlfm.train.vlm import build_model


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png(image)).decode()


@pytest.fixture(scope="module")
def served(trained_run, tmp_path_factory):
    """The tiny CLIP model, an index of 40 rendered scenes it built, a tiny assistant and a few images."""
    folder = tmp_path_factory.mktemp("serve")
    world = ShapesWorld(WorldConfig(image_size=32))
    scenes = [world.scene("val", i) for i in range(40)]
    for i, scene in enumerate(scenes):
        world.render(scene).save(folder / f"{i:04d}.png")
    model = vlfm.load(trained_run).eval()
    index = SearchIndex.create(folder / "idx", model, str(trained_run))
    index.add_images(model, [(folder / f"{i:04d}.png", captions(s)[0]) for i, s in enumerate(scenes)], progress=False)
    torch.manual_seed(0)
    vlm = build_model(tiny_vlm_config(tmp_path_factory.mktemp("vlm"))).eval()
    with torch.no_grad():  # untrained, its greedy answers are special tokens that decode to nothing: mute them
        vlm.lm.embed_tokens.weight[[i for i in range(vlm.lm.config.vocab_size) if vlm.tokenizer.decode([i]) == ""]] = 0
    images = [Image.open(folder / f"{i:04d}.png").convert("RGB") for i in range(3)]
    return SimpleNamespace(run=trained_run, model=model, index=folder / "idx", folder=folder, vlm=vlm, images=images)


def app_for(served, **options):
    return create_app(served.model, "tiny", served.index, served.vlm, "tiny-vlm", **options)


@pytest.fixture(scope="module")
def client(served):
    with TestClient(app_for(served)) as client:
        yield client


def error_of(response, status: int, type_: str, words: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["type"] == type_, body
    assert words in body["error"]["message"], body
    return body["error"]["message"]


# --- values -----------------------------------------------------------------------------------------------------
def test_embeddings_equal_the_model_in_openai_shape(client, served):
    texts = ["a red circle", "a blue square"]
    r = client.post("/v1/embeddings", json={"input": [texts[0], data_url(served.images[0]), texts[1]]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "tiny" and [d["index"] for d in body["data"]] == [0, 1, 2]
    got = np.array([d["embedding"] for d in body["data"]])
    text = served.model.embed_texts(texts).numpy()
    image = served.model.embed_images(served.images[:1]).numpy()
    np.testing.assert_allclose(got, np.stack([text[0], image[0], text[1]]), atol=1e-5)
    tokens = sum(len(served.model.tokenizer.encode(t)) for t in texts)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}

    one = client.post("/v1/embeddings", json={"input": "a red circle", "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(one["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, text[0], atol=1e-5)
    bare = base64.b64encode(png(served.images[1])).decode()
    r = client.post("/v1/embeddings", json={"input": [bare], "modality": "image"}).json()
    np.testing.assert_allclose(r["data"][0]["embedding"], served.model.embed_images(served.images[1:2])[0], atol=1e-5)


def test_classify_json_and_upload_equal_model_classify(client, served):
    labels, templates = ["a red circle", "a blue square", "a green star"], ["a photo of {}", "{}"]
    expected = served.model.classify(served.images[:2], labels, templates)
    r = client.post("/v1/classify", json={"images": [data_url(i) for i in served.images[:2]], "labels": labels,
                                          "templates": templates})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["activation"] == "softmax"
    for row, probs in zip(body["data"], expected):
        got = {x["label"]: x["probability"] for x in row["labels"]}
        assert [x["probability"] for x in row["labels"]] == sorted(got.values(), reverse=True)  # ranked
        np.testing.assert_allclose([got[label] for label in labels], probs.numpy(), atol=1e-5)
    upload = client.post("/v1/classify", files=[("image", ("a.png", png(served.images[0]), "image/png"))],
                         data={"labels": ",".join(labels)})  # fmt: skip
    assert upload.status_code == 200, upload.text
    got = {x["label"]: x["probability"] for x in upload.json()["data"][0]["labels"]}
    np.testing.assert_allclose([got[label] for label in labels], served.model.classify(served.images[:1], labels)[0], atol=1e-5)


def test_search_by_text_and_image_equals_the_index_and_serves_the_images(client, served):
    index = SearchIndex.open(served.index)
    expected = index.search(served.model.embed_texts(["a red circle"]).numpy(), 5)[0]
    body = client.post("/v1/search", json={"query": "a red circle", "k": 5}).json()
    assert [(d["id"], d["name"], d["caption"]) for d in body["data"]] == [(h.id, f"{h.path[-8:]}", h.caption) for h in expected]
    np.testing.assert_allclose([d["score"] for d in body["data"]], [h.score for h in expected], atol=1e-5)
    by_image = client.post("/v1/search", json={"image": data_url(served.images[2]), "k": 1}).json()["data"][0]
    assert by_image["name"] == "0002.png" and by_image["score"] > 0.999
    r = client.get(by_image["url"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == (served.folder / "0002.png").read_bytes()


def test_chat_equals_model_chat_and_streams_the_same_answer(client, served):
    image, question = served.images[0], "how many shapes?"
    expected = served.vlm.chat(image, question, max_new_tokens=8)
    assert expected  # visible text, streamed in pieces below
    message = {"role": "user", "content": [{"type": "text", "text": question},
                                           {"type": "image_url", "image_url": {"url": data_url(image)}}]}  # fmt: skip
    r = client.post("/v1/chat/completions", json={"messages": [message], "max_tokens": 8})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"] == {"role": "assistant", "content": expected}
    assert body["choices"][0]["finish_reason"] in ("stop", "length") and body["usage"]["completion_tokens"] <= 8

    with client.stream("POST", "/v1/chat/completions", json={"messages": [message], "max_tokens": 8, "stream": True}) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks]
    assert "".join(pieces) == expected and sum(bool(p) for p in pieces) >= 3
    assert chunks[-1]["choices"][0]["finish_reason"] == body["choices"][0]["finish_reason"]

    # an earlier turn carries the image: the history holds its placeholder, as `vlfm chat` builds it
    turns = [message, {"role": "assistant", "content": "two"}, {"role": "user", "content": "what colour is the circle?"}]
    later = client.post("/v1/chat/completions", json={"messages": turns, "max_tokens": 6}).json()
    history = [("user", f"<image>\n{question}"), ("assistant", "two")]
    assert later["choices"][0]["message"]["content"] == served.vlm.chat(image, "what colour is the circle?", history, max_new_tokens=6)
    # sampling: the seed makes it repeatable, and it is model.chat's sampling
    sampled = client.post("/v1/chat/completions", json={"messages": [message], "max_tokens": 6, "temperature": 1.0, "seed": 3}).json()
    generator = torch.Generator().manual_seed(3)
    assert sampled["choices"][0]["message"]["content"] == served.vlm.chat(image, question, max_new_tokens=6, temperature=1.0, generator=generator)


def test_api_docs_render_offline(client):
    """/docs is Swagger UI from files the server ships: every script and stylesheet it names is served here."""
    import re

    page = client.get("/docs")
    assert page.status_code == 200 and "/openapi.json" in page.text
    assets = re.findall(r"""(?:src|href)=["'](/[^"']+\.(?:js|css))""", page.text)
    assert len(assets) >= 2 and not re.search(r"""(?:src|href)=["']https?://""", page.text)
    for asset in assets:
        assert client.get(asset).status_code == 200, asset


def test_healthz_page_and_metrics(client):
    assert client.get("/healthz").json() == {"status": "ok", "model": "tiny", "search": True, "chat": True, "auth": False}
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    client.post("/v1/embeddings", json={"input": ["a", "b", "c"]})
    client.post("/v1/embeddings", json={"input": []})
    text = client.get("/metrics").text
    assert 'vlfm_requests_total{method="POST",route="/v1/embeddings",status="200"}' in text
    assert 'vlfm_errors_total{route="/v1/embeddings",type="invalid_request_error"}' in text
    assert 'vlfm_request_seconds_bucket{le="+Inf",route="/v1/embeddings"}' in text
    assert 'vlfm_batch_size_count{kind="text"}' in text


# --- errors and limits ---------------------------------------------------------------------------------------------
def test_every_bad_request_is_a_4xx_json_error(client, served):
    post = client.post
    error_of(post("/v1/embeddings", json={}), 422, "invalid_request_error", "input: Field required")
    error_of(post("/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"}), 422, "invalid_request_error", "JSON")
    error_of(post("/v1/embeddings", json={"input": []}), 400, "invalid_request_error", "input is an empty list")
    error_of(post("/v1/embeddings", json={"input": ["  "]}), 400, "invalid_request_error", "input[0] is empty")
    error_of(post("/v1/embeddings", json={"input": ["data:image/png;base64,AAAA"]}), 400, "invalid_image", "input[0] is not a readable image")
    error_of(post("/v1/embeddings", json={"input": ["%%%"], "modality": "image"}), 400, "invalid_request_error", "not valid base64")
    error_of(post("/v1/embeddings", json={"input": ["data:text/plain;base64,aGk="]}), 400, "invalid_request_error", "not an image")
    error_of(post("/v1/embeddings", json={"input": "x", "modality": "audio"}), 422, "invalid_request_error", "modality")
    error_of(post("/v1/classify", json={"images": [data_url(served.images[0])], "labels": []}), 400, "invalid_request_error", "no labels")
    error_of(post("/v1/classify", json={"images": [], "labels": ["a"]}), 400, "invalid_request_error", "no images")
    error_of(post("/v1/classify", json={"images": [data_url(served.images[0])], "labels": ["a"], "templates": ["a {} {}"]}),
             400, "invalid_request_error", "exactly one {}")  # fmt: skip
    error_of(post("/v1/classify", json={"images": [data_url(served.images[0])], "labels": ["a"], "templates": ["{0} {x}"]}),
             400, "invalid_request_error", "exactly one {}")  # fmt: skip
    error_of(post("/v1/classify", json={"labels": ["a"]}), 422, "invalid_request_error", "images: Field required")
    error_of(post("/v1/classify", content=b"x", headers={"content-type": "text/plain"}), 415, "unsupported_media_type", "not text/plain")
    error_of(post("/v1/classify", files={"labels": (None, "a,b"), "image": (None, "not a file")}), 400, "invalid_request_error", "must be a file upload")
    error_of(post("/v1/classify", files=[("image", ("x.png", b"GIF89a broken", "image/png"))], data={"labels": "a"}),
             400, "invalid_image", "x.png is not a readable image")  # fmt: skip
    error_of(post("/v1/search", json={"query": "a", "image": data_url(served.images[0])}), 400, "invalid_request_error", "not both")
    error_of(post("/v1/search", json={"k": 3}), 400, "invalid_request_error", "not both and not neither")
    error_of(post("/v1/search", json={"query": "a", "k": 0}), 422, "invalid_request_error", "k: Input should be greater")
    error_of(client.get("/v1/images/99999"), 404, "not_found_error", "no indexed image has id 99999")
    error_of(client.get("/v1/images/-1"), 422, "invalid_request_error", "image_id")
    error_of(client.get("/v1/images/../../etc/passwd"), 404, "not_found_error", "Not Found")
    error_of(client.get("/nowhere"), 404, "not_found_error", "Not Found")
    error_of(client.get("/v1/search"), 405, "method_not_allowed", "Method Not Allowed")
    assert client.get("/healthz").status_code == 200  # and it goes on serving


def test_chat_errors(client, served):
    url = data_url(served.images[0])
    image = {"type": "image_url", "image_url": {"url": url}}

    def chat(messages, **more):
        return client.post("/v1/chat/completions", json={"messages": messages, **more})

    error_of(chat([]), 400, "invalid_request_error", "messages is empty")
    error_of(chat([{"role": "user", "content": "hi"}]), 400, "invalid_request_error", "exactly one image_url part (found 0)")
    error_of(chat([{"role": "user", "content": [image, image, {"type": "text", "text": "hi"}]}]), 400, "invalid_request_error", "found 2")
    error_of(chat([{"role": "user", "content": [image, {"type": "text", "text": "hi"}]}, {"role": "assistant", "content": "x"}]),
             400, "invalid_request_error", "last message must be the user's")  # fmt: skip
    error_of(chat([{"role": "user", "content": [image, {"type": "text", "text": "<image> hi"}]}]), 400, "invalid_request_error", "'<image>'")
    error_of(chat([{"role": "robot", "content": "hi"}]), 422, "invalid_request_error", "role")
    error_of(chat([{"role": "user", "content": [{"type": "video", "url": "x"}]}]), 422, "invalid_request_error", "content")
    error_of(chat([{"role": "user", "content": [image, {"type": "text", "text": "hi"}]}], temperature=-1), 422, "invalid_request_error", "temperature")
    long = {"role": "user", "content": [image, {"type": "text", "text": "how many " * 100}]}
    error_of(chat([long]), 400, "limit_exceeded", "context holds 96")


def test_an_assistant_without_tokenizer_answers_400_not_500(served):
    bare = type(served.vlm)(served.vlm.config)  # no tokenizer: as loaded from a directory without tokenizer.json
    image = {"type": "image_url", "image_url": {"url": data_url(served.images[0])}}
    message = {"role": "user", "content": [image, {"type": "text", "text": "hi"}]}
    with TestClient(create_app(served.model, "tiny", None, bare, "bare")) as c:
        for stream in (False, True):
            r = c.post("/v1/chat/completions", json={"messages": [message], "stream": stream})
            error_of(r, 400, "invalid_request_error", "no tokenizer, so it cannot read a prompt")


def test_limits_are_enforced_with_the_flag_named(served):
    limits = Limits(max_body_bytes=20_000, max_pixels=40 * 40, max_inputs=2, max_labels=2, max_text_chars=20, max_k=3,
                    max_tokens=4, max_messages=2)  # fmt: skip
    url = data_url(served.images[0])
    with TestClient(app_for(served, limits=limits)) as c:
        error_of(c.post("/v1/embeddings", json={"input": ["a", "b", "c"]}), 400, "limit_exceeded", "over the limit of 2 (the server's --max-inputs)")
        error_of(c.post("/v1/embeddings", json={"input": "x" * 21}), 400, "limit_exceeded", "--max-text-chars")
        big = data_url(Image.new("RGB", (41, 40)))
        error_of(c.post("/v1/embeddings", json={"input": [big]}), 413, "limit_exceeded", "41 x 40 = 1,640 pixels, over the cap of 1,600")
        error_of(c.post("/v1/embeddings", json={"input": "x" * 30_000}), 413, "limit_exceeded", "over the limit of 20,000 bytes")
        error_of(c.post("/v1/embeddings", content=iter([b'{"input": "', b"x" * 25_000, b'"}']), headers={"content-type": "application/json"}),
                 413, "limit_exceeded", "--max-body-bytes")  # fmt: skip  # chunked: no Content-Length
        error_of(c.post("/v1/classify", json={"images": [url], "labels": ["a", "b", "c"]}), 400, "limit_exceeded", "--max-labels")
        error_of(c.post("/v1/classify", json={"images": [url] * 3, "labels": ["a"]}), 400, "limit_exceeded", "--max-inputs")
        error_of(c.post("/v1/search", json={"query": "a", "k": 4}), 400, "limit_exceeded", "--max-k")
        chat = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": url}}]}]}
        error_of(c.post("/v1/chat/completions", json={**chat, "max_tokens": 5}), 400, "limit_exceeded", "--max-tokens")
        error_of(c.post("/v1/chat/completions", json={"messages": chat["messages"] * 3}), 400, "limit_exceeded", "--max-messages")
        ok = c.post("/v1/chat/completions", json=chat).json()  # the default max_tokens is the limit
        assert ok["usage"]["completion_tokens"] <= 4
        assert c.post("/v1/search", json={"query": "a", "k": 3}).status_code == 200


def test_api_key_guards_every_v1_route(served, monkeypatch):
    with TestClient(app_for(served, api_key="s3cret")) as c:
        for method, path in [("post", "/v1/embeddings"), ("post", "/v1/classify"), ("post", "/v1/search"),
                             ("get", "/v1/images/0"), ("post", "/v1/chat/completions")]:  # fmt: skip
            error_of(getattr(c, method)(path), 401, "authentication_error", "Authorization: Bearer KEY")
            error_of(getattr(c, method)(path, headers={"Authorization": "Bearer nope"}), 401, "authentication_error", "API key")
        ok = c.post("/v1/embeddings", json={"input": "a"}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/").status_code == 200  # the page loads; it asks for the key
        assert "access-control-allow-origin" not in c.options("/v1/embeddings", headers={"Origin": "http://x"}).headers


def test_servers_without_index_or_assistant_say_so(served):
    with TestClient(create_app(served.model, "tiny")) as c:
        error_of(c.post("/v1/search", json={"query": "a"}), 404, "not_found_error", "--index INDEX")
        error_of(c.get("/v1/images/0"), 404, "not_found_error", "--index INDEX")
        error_of(c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}), 404, "not_found_error", "--vlm VLM")


def test_an_index_of_another_model_is_refused_at_start(served, tmp_path):
    model = type(served.model)(served.model.config, served.model.tokenizer)  # same shape, fresh weights
    with pytest.raises(SearchError, match="fingerprint"):
        create_app(model, "fresh", served.index)


def test_cli_refuses_wrong_models_in_one_line(served, tmp_path, capsys):
    from vlfm.cli import main

    served.vlm.save(tmp_path / "vlm")
    cases = [([str(tmp_path / "vlm")], "serve needs an image-text model; this checkpoint is a VisionLanguageModel"),
             ([str(served.run), "--vlm", str(served.run)], "--vlm needs a vision-language model"),
             ([str(served.run), "--port", "70000"], "--port 70000 is not a port"),
             ([str(served.run), "--index", str(tmp_path)], "is not an index (no meta.sqlite)")]  # fmt: skip
    for args, words in cases:
        assert main(["serve", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("vlfm serve: error: ") and words in err and len(err.strip().splitlines()) == 1


def test_cli_without_the_serve_extra_says_how_to_install_it(served, capsys, monkeypatch):
    from vlfm.cli import main

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed: importing it raises ImportError
    assert main(["serve", str(served.run)]) == 2
    assert "vlfm serve needs its extra (uvicorn is not installed): pip install -e '.[serve]'" in capsys.readouterr().err


# --- the batcher -----------------------------------------------------------------------------------------------------
class CountingModel:
    """Embeds texts as their lengths; records each forward pass's size and whether two ever overlapped."""

    def __init__(self):
        self.passes, self.busy, self.overlap = [], threading.Lock(), False

    def embed_texts(self, texts):
        if not self.busy.acquire(blocking=False):
            self.overlap = True
        try:
            self.passes.append(len(texts))
            return torch.tensor([[float(len(t))] for t in texts])
        finally:
            self.busy.release()

    embed_images = embed_texts


@pytest.mark.parametrize("max_batch", [1, 8])
def test_batcher_shares_passes_up_to_max_batch_and_never_overlaps(max_batch):
    model = CountingModel()
    batcher = Batcher(model, max_batch=max_batch, max_wait=0.05)
    batcher.start()

    async def clients():
        return await asyncio.gather(*(batcher.embed("text", ["x" * n]) for n in range(1, 21)))

    try:
        results = asyncio.run(clients())
    finally:
        batcher.stop()
    assert [float(r[0, 0]) for r in results] == [float(n) for n in range(1, 21)]  # each gets its own row
    assert sum(model.passes) == 20 and max(model.passes) <= max_batch and not model.overlap
    assert len(model.passes) == (20 if max_batch == 1 else 3)  # 8 + 8 + 4 within one wait each


def test_batcher_refuses_settings_that_cannot_batch():
    with pytest.raises(UsageError, match="max_batch must be >= 1 and max_wait >= 0, got 0 and 0.005"):
        Batcher(CountingModel(), max_batch=0)
    with pytest.raises(UsageError, match="got 4 and -1"):
        Batcher(CountingModel(), max_batch=4, max_wait=-1)


def test_batcher_reports_errors_to_their_requests_and_goes_on():
    class Failing(CountingModel):
        def embed_texts(self, texts):
            if "boom" in texts:
                raise RuntimeError("boom")
            return super().embed_texts(texts)

    batcher = Batcher(Failing(), max_batch=4, max_wait=0.0)
    batcher.start()

    async def run():
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.embed("text", ["boom"])
        return await batcher.embed("text", ["abc"]), await batcher.call(lambda a, b: a + b, 2, 3)

    try:
        vector, total = asyncio.run(run())
    finally:
        batcher.stop()
    assert vector.tolist() == [[3.0]] and total == 5
