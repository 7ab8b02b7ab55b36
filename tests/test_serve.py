"""`gradientspace serve`, `route` and `backend-command` on a tiny-random run, over loopback with the official client."""

import json
import shlex
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from conftest import accept_edits, copied_run, opened_run
from safetensors.torch import load_file, save_file

from gradientspace.cli import main
from gradientspace.config import config_from_run
from gradientspace.routing.model import StrategyModel, served_adapters, serving_names
from gradientspace.runs import RunDirectory

pytest.importorskip("fastapi")
import uvicorn  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, Response, StreamingResponse  # noqa: E402

from gradientspace.serving.backends import BackendError  # noqa: E402
from gradientspace.serving.route_proxy import create_route_app, upstream_base  # noqa: E402
from gradientspace.serving.server import build  # noqa: E402

PROMPTS = [
    "What is 2 + 3?",
    "Write a haiku about the sea.",
    "def add(a, b):",
    "Summarise the plot of Hamlet.",
    "Is the market up today?",
    "Name three prime numbers.",
    "Translate hello into French.",
    "Why is the sky blue?",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Background:
    """A uvicorn server for `app` on a free loopback port, in a thread of this process."""

    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # log_config=None: see `Docs.serve_on` in test_docs.py (uvicorn's dictConfig closes pytest's capture through absl)
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", log_config=None)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, served_tiny_run):
    """A copy of the shared tiny run (every expert served) whose adapters are pushed far apart, so that each one answers differently."""
    run = copied_run(served_tiny_run, tmp_path_factory.mktemp("serve"))
    for seed, served in enumerate(served_adapters(opened_run(run))):
        path = served.folder / "adapter_model.safetensors"
        generator = torch.Generator().manual_seed(seed)
        weights = {
            k: torch.randn(v.shape, generator=generator) * (0.5 if "lora_B" in k else 1.0)
            for k, v in load_file(str(path)).items()
        }
        save_file(weights, str(path))
    accept_edits(run)
    return run


@pytest.fixture(scope="module")
def served(run_dir):
    config = config_from_run(run_dir, {"serve.batch_window_ms": 150})
    app, engine = build(config)
    server = Background(app)
    yield server, engine
    server.stop()
    engine.close()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served[0].url}/v1", api_key="unused", max_retries=0)


def chat(client, model, prompt, **kwargs):
    kwargs = {"max_tokens": 6, "temperature": 0, **kwargs}
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], **kwargs)


# ------------------------------------------------------------------ serve


@pytest.fixture(scope="module")
def strategy_model(run_dir):
    return StrategyModel(config_from_run(run_dir), ["routed"])


def test_served_names_load_their_folders(strategy_model):
    """Each public model id answers with the weights in the folder that `backend-command` hands to vLLM."""
    from peft import get_peft_model_state_dict

    model = strategy_model
    names = serving_names(model)
    assert list(names) == ["expert-0", "expert-1", "expert-2", "generalist"]
    for served in served_adapters(model.run):
        loaded = get_peft_model_state_dict(model.model, adapter_name=names[served.name])
        on_disk = load_file(str(served.folder / "adapter_model.safetensors"))
        assert set(loaded) == set(on_disk)
        assert all(torch.equal(loaded[k], on_disk[k]) for k in on_disk)


def test_stacked_lora_batch_equals_each_adapter_alone(strategy_model):
    from gradientspace.models.bank import StackedLoRA

    peft_model = strategy_model.model
    adapters = list(serving_names(strategy_model).values())
    rows = [adapters[i % len(adapters)] for i in range(6)]
    ids = torch.randint(10, 5000, (6, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with StackedLoRA(peft_model, adapters).batch(rows):
            mixed = peft_model(input_ids=ids).logits
        alone = []
        for row, adapter in enumerate(rows):
            peft_model.set_adapter(adapter)
            alone.append(peft_model(input_ids=ids[row : row + 1]).logits[0])
        peft_model.set_adapter(rows[0])
        after = peft_model(input_ids=ids[:1]).logits[0]  # the hooks are gone, peft's own LoRA is back
    between_adapters = (alone[0] - alone[1]).abs().max()
    for row in range(len(rows)):  # equal up to float summation order (a batch of 6 vs 1)
        assert (mixed[row] - alone[row]).abs().max() < min(1e-3, 1e-2 * between_adapters)
    assert torch.equal(after, alone[0])


def test_model_list(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["gradientspace", "expert-0", "expert-1", "expert-2", "generalist"]
    assert {m.model_extra["parent"] for m in models} == {"tiny-random"}


def test_routed_chat_names_its_expert(client):
    raw = client.chat.completions.with_raw_response.create(
        model="gradientspace", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=5, temperature=0
    )
    body = raw.parse()
    expert, probability = raw.headers["x-gradientspace-expert"], float(raw.headers["x-gradientspace-probability"])
    assert expert in {"expert-0", "expert-1", "expert-2", "generalist"} and 0 < probability <= 1
    assert body.model == expert and body.model_extra["gradientspace"]["expert"] == expert
    assert body.model_extra["gradientspace"]["probability"] == pytest.approx(probability, abs=1e-4)
    assert body.usage.completion_tokens == 5 and body.choices[0].finish_reason == "length"
    # pinning the routed expert gives the same answer
    assert chat(client, expert, PROMPTS[0], max_tokens=5).choices[0].message.content == body.choices[0].message.content


def test_pinned_expert(client):
    raw = client.chat.completions.with_raw_response.create(
        model="expert-1", messages=[{"role": "user", "content": PROMPTS[1]}], max_tokens=3, temperature=0
    )
    assert (
        raw.headers["x-gradientspace-expert"] == "expert-1" and float(raw.headers["x-gradientspace-probability"]) == 1.0
    )
    assert raw.parse().model == "expert-1"


@pytest.mark.parametrize("model", ["gradientspace", "expert-2"])
def test_chat_stream_matches_whole_answer(client, model):
    whole = chat(client, model, PROMPTS[2])
    with client.chat.completions.with_streaming_response.create(
        model=model,
        messages=[{"role": "user", "content": PROMPTS[2]}],
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ) as raw:
        assert raw.headers["x-gradientspace-expert"] == whole.model and "x-gradientspace-probability" in raw.headers
        lines = [line for line in raw.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == whole.choices[0].message.content
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 6 and all(c["model"] == whole.model for c in chunks)


def test_completions_with_and_without_stream(client):
    whole = client.completions.create(model="generalist", prompt="Once upon a time", max_tokens=5, temperature=0)
    assert whole.model == "generalist" and whole.usage.completion_tokens == 5
    streamed = "".join(
        chunk.choices[0].text
        for chunk in client.completions.create(
            model="generalist", prompt="Once upon a time", max_tokens=5, temperature=0, stream=True
        )
    )
    assert streamed == whole.choices[0].text != ""
    routed = client.completions.with_raw_response.create(
        model="gradientspace", prompt="Once upon a time", max_tokens=2, temperature=0
    )
    assert routed.headers["x-gradientspace-expert"] == routed.parse().model


def test_stop_string_cuts_the_answer(client):
    full = chat(client, "expert-0", PROMPTS[3], max_tokens=8).choices[0].message.content
    stop = full[4:6]
    cut = chat(client, "expert-0", PROMPTS[3], max_tokens=8, stop=[stop]).choices[0]
    assert len(full) > 6 and cut.message.content == full[: full.index(stop)] and cut.finish_reason == "stop"


def test_seed_reproduces_a_sample_inside_any_batch(client):
    def sample(seed):
        return chat(client, "expert-0", PROMPTS[4], max_tokens=8, temperature=1.0, seed=seed).choices[0].message.content

    alone = sample(7)
    with ThreadPoolExecutor(4) as pool:  # the same seeded request, now batched with others
        together = list(
            pool.map(
                lambda i: sample(7) if i == 0 else chat(client, "expert-1", PROMPTS[i]).choices[0].message.content,
                range(4),
            )
        )
    assert together[0] == alone
    assert any(sample(seed) != alone for seed in (8, 9, 10))


def reference_answer(run_dir, folder, prompt: str, max_tokens: int) -> str:
    """The naive reference: the adapter folder alone on the base model, batch 1, transformers' greedy generate."""
    from peft import PeftModel

    from gradientspace.data.records import Record
    from gradientspace.data.tokens import prompt_text
    from gradientspace.models.loading import load_base_model, load_tokenizer

    tokenizer = load_tokenizer("tiny-random")
    model = PeftModel.from_pretrained(load_base_model("tiny-random", torch.device("cpu")), str(folder)).eval()
    ids = tokenizer(
        prompt_text(tokenizer, Record("q", [{"role": "user", "content": prompt}], "")),
        add_special_tokens=False,
        return_tensors="pt",
    )["input_ids"]
    eos = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode([t for t in out[0, ids.shape[1] :].tolist() if t not in eos], skip_special_tokens=True)


def test_concurrent_requests_to_different_experts_equal_each_alone(served, client, run_dir):
    server, engine = served
    folders = {s.name: s.folder for s in served_adapters(opened_run(run_dir))}
    models = [list(folders)[i % len(folders)] for i in range(8)]
    expected = [reference_answer(run_dir, folders[m], p, 8) for m, p in zip(models, PROMPTS)]
    assert len(set(expected)) > 4  # the adapters really answer differently
    before = dict(engine.stats)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda mp: chat(client, mp[0], mp[1], max_tokens=8), zip(models, PROMPTS)))
    assert [a.choices[0].message.content for a in answers] == expected
    assert [a.model for a in answers] == models
    assert engine.stats["mixed_batches"] > before.get("mixed_batches", 0) and engine.stats["largest_batch"] >= 5


def test_errors_are_openai_shaped_and_the_server_survives(served, client):
    url = served[0].url
    with pytest.raises(openai.NotFoundError) as err:
        chat(client, "expert-99", "hi")
    assert err.value.body["code"] == "model_not_found" and "expert-0" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, "gradientspace", "word " * 2500)
    assert "2048" in err.value.body["message"] and err.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, "gradientspace", "hi", max_tokens=2040)
    assert "2048" in err.value.body["message"] and err.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, "gradientspace", "hi", n=2)
    assert err.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="gradientspace", prompt=["a", "b"], max_tokens=2)
    assert err.value.body["param"] == "prompt"
    for body in (
        b"{not json",
        b'{"model": "gradientspace"}',
        b'{"model": "gradientspace", "messages": [{"role": "user"}]}',
        b'{"model": "gradientspace", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}',
    ):
        response = httpx.post(f"{url}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400 and set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    assert chat(client, "gradientspace", "still there?", max_tokens=2).usage.completion_tokens == 2


def test_disconnected_client_cancels_its_generation(served):
    server, engine = served
    before = engine.stats["cancelled"]
    body = {"model": "generalist", "prompt": "Once upon a time", "max_tokens": 1900, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
        next(response.iter_lines())
    deadline = time.time() + 20
    while engine.stats["cancelled"] == before and time.time() < deadline:
        time.sleep(0.05)
    assert engine.stats["cancelled"] == before + 1


# ------------------------------------------------------------------ route


class Stub:
    """An upstream that records each request and answers with fixed bytes (SSE when streaming)."""

    ANSWER = b'{"id": "x", "object": "chat.completion", "choices": [], "odd spacing":  true}'
    STREAM = b'data: {"a": 1}\n\ndata: {"b": 2}\n\ndata: [DONE]\n\n'

    SLOW = 99  # a request with this max_tokens is answered only after SLOW_SECONDS

    def __init__(self, ids: list[str], key: str | None = None):
        self.received: list[dict] = []
        self.headers: list[dict] = []  # of each generation request, as the upstream received them
        app = FastAPI()

        @app.middleware("http")
        async def keyed(request: Request, call_next):  # as vLLM's --api-key: every /v1 route needs it
            if key and request.headers.get("authorization") != f"Bearer {key}":
                return JSONResponse({"error": {"message": "unauthorized"}}, status_code=401)
            return await call_next(request)

        @app.get("/v1/models")
        async def models():
            return {
                "object": "list",
                "data": [{"id": i, "object": "model", "parent": None if n == 0 else ids[0]} for n, i in enumerate(ids)],
            }

        @app.post("/v1/chat/completions")
        @app.post("/v1/completions")
        async def answer(request: Request):
            import asyncio

            body = await request.json()
            self.received.append(body)
            self.headers.append(dict(request.headers))
            if body.get("max_tokens") == self.SLOW:
                await asyncio.sleep(3)
            if body.get("stream"):
                return StreamingResponse(iter([self.STREAM[:9], self.STREAM[9:]]), media_type="text/event-stream")
            if body.get("max_tokens") == 13:
                return JSONResponse({"error": {"message": "upstream says no"}}, status_code=422)
            return Response(self.ANSWER, media_type="application/json")

        self.server = Background(app)


@pytest.fixture(scope="module")
def router(run_dir):
    from gradientspace.experts.strategies import get
    from gradientspace.routing.router import Router

    run = RunDirectory(run_dir)
    return Router.load(get("routed").router_folder(run), torch.device("cpu"))


@pytest.mark.parametrize("backend", ["vllm", "sglang"])
def test_route_rewrites_model_and_relays_bytes(backend, run_dir, router):
    adapters = served_adapters(opened_run(run_dir))
    names = [s.name if backend == "vllm" else f"BASE:{s.name}" for s in adapters]
    stub = Stub(["BASE"] + names)
    assert upstream_base(stub.server.url, backend, adapters) == "BASE"
    proxy = Background(
        create_route_app(router, adapters, "BASE", f"{stub.server.url}/v1/", backend)
    )  # the OpenAI-style URL works too
    try:
        request = {
            "model": "gradientspace",
            "messages": [{"role": "user", "content": PROMPTS[0]}],
            "max_tokens": 4,
            "temperature": 0.3,
            "top_k": 5,
        }
        response = httpx.post(f"{proxy.url}/v1/chat/completions", json=request)
        assert response.status_code == 200 and response.content == Stub.ANSWER
        expert = response.headers["x-gradientspace-expert"]
        expected_expert = {s.expert: s.name for s in adapters}.get(router.route([PROMPTS[0]])[0][0], "generalist")
        assert expert == expected_expert and 0 < float(response.headers["x-gradientspace-probability"]) <= 1
        sent = stub.received[-1]
        assert sent == {
            **request,
            "model": expert if backend == "vllm" else f"BASE:{expert}",
        }  # every other field untouched

        pinned = httpx.post(f"{proxy.url}/v1/completions", json={"model": "expert-1", "prompt": "hi", "max_tokens": 13})
        assert pinned.status_code == 422 and pinned.json() == {
            "error": {"message": "upstream says no"}
        }  # status and body relayed
        assert stub.received[-1]["model"] == ("expert-1" if backend == "vllm" else "BASE:expert-1")

        with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", json={**request, "stream": True}) as streamed:
            assert streamed.headers["x-gradientspace-expert"] == expert
            assert b"".join(streamed.iter_raw()) == Stub.STREAM

        missing = httpx.post(f"{proxy.url}/v1/chat/completions", json={**request, "model": "expert-9"})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    finally:
        proxy.stop()
        stub.server.stop()


def test_route_refuses_an_upstream_without_the_experts(run_dir):
    adapters = served_adapters(opened_run(run_dir))
    stub = Stub(["BASE", "expert-0", "generalist"])
    try:
        with pytest.raises(BackendError, match="expert-1, expert-2"):
            upstream_base(stub.server.url, "vllm", adapters)
    finally:
        stub.server.stop()
    with pytest.raises(BackendError, match="GET /v1/models failed"):
        upstream_base(f"http://127.0.0.1:{free_port()}", "vllm", adapters)


def test_route_answers_502_when_the_upstream_is_gone(run_dir, router):
    adapters = served_adapters(opened_run(run_dir))
    proxy = Background(create_route_app(router, adapters, "BASE", f"http://127.0.0.1:{free_port()}", "vllm"))
    try:
        response = httpx.post(
            f"{proxy.url}/v1/chat/completions",
            json={"model": "gradientspace", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert response.status_code == 502 and response.json()["error"]["code"] == "upstream_unreachable"
        assert "x-gradientspace-expert" not in response.headers
    finally:
        proxy.stop()


def test_route_keys_probes_times_out_and_counts_like_serve(run_dir, router):
    """Behind an upstream that needs its own key: `route` starts with that key, sends it and never its client's, answers
    /health 503 once the upstream is gone, 504 when it is slow, and /metrics counts routed requests as `serve` does."""
    from prometheus_client.parser import text_string_to_metric_families

    from gradientspace.config import ServeConfig

    adapters = served_adapters(opened_run(run_dir))
    stub = Stub(["BASE", *(s.name for s in adapters)], key="upstream-key")
    with pytest.raises(BackendError, match="needs a key it was not given: give `--upstream-api-key`"):
        upstream_base(stub.server.url, "vllm", adapters)
    assert upstream_base(stub.server.url, "vllm", adapters, key="upstream-key") == "BASE"
    settings = ServeConfig(upstream_timeout_s=0.5)
    proxy = Background(
        create_route_app(
            router,
            adapters,
            "BASE",
            stub.server.url,
            "vllm",
            settings,
            api_key="client-key",
            upstream_key="upstream-key",
        )
    )
    keyed = {"authorization": "Bearer client-key"}
    request = {"model": "gradientspace", "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 4}
    try:
        assert httpx.get(f"{proxy.url}/health").json()["status"] == "ok"
        answered = httpx.post(f"{proxy.url}/v1/chat/completions", json=request, headers=keyed)
        assert answered.status_code == 200 and answered.content == Stub.ANSWER
        assert stub.headers[-1]["authorization"] == "Bearer upstream-key"
        assert not any("client-key" in value for value in stub.headers[-1].values())
        slow = httpx.post(f"{proxy.url}/v1/chat/completions", json={**request, "max_tokens": Stub.SLOW}, headers=keyed)
        assert (
            slow.status_code == 504
            and slow.json()["error"]["code"] == "upstream_timeout"
            and "0.5 s" in slow.json()["error"]["message"]
        )
        metrics = {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(httpx.get(f"{proxy.url}/metrics").text)
            for s in family.samples
        }
        count = lambda name, **labels: sum(
            v for (n, ls), v in metrics.items() if n == name and set(labels.items()) <= ls
        )
        assert count("gradientspace_expert_requests_total", expert=answered.headers["x-gradientspace-expert"]) == 1
        assert count("gradientspace_router_top_probability_count") == 1 == count("gradientspace_router_picks_total")
        assert count("gradientspace_requests_total", endpoint="/v1/chat/completions", status="504") == 1
    finally:
        stub.server.stop()
    try:
        down = httpx.get(f"{proxy.url}/health")
        assert (
            down.status_code == 503
            and down.json()["status"] == "unavailable"
            and "ConnectError" in down.json()["reason"]
        )
    finally:
        proxy.stop()


def test_route_in_front_of_gradientspace_serve(served, client, run_dir, router):
    """`serve` speaks the API `route` expects of vLLM: routed through both, the answer is the server's own."""
    adapters = served_adapters(opened_run(run_dir))
    base = upstream_base(served[0].url, "vllm", adapters)
    proxy = Background(create_route_app(router, adapters, base, served[0].url, "vllm"))
    try:
        through = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0)
        for prompt in PROMPTS[:3]:
            raw = through.chat.completions.with_raw_response.create(
                model="gradientspace", messages=[{"role": "user", "content": prompt}], max_tokens=5, temperature=0
            )
            direct = chat(client, "gradientspace", prompt, max_tokens=5)
            assert raw.headers["x-gradientspace-expert"] == direct.model == raw.parse().model
            assert raw.parse().choices[0].message.content == direct.choices[0].message.content
        streamed = "".join(
            c.choices[0].delta.content or "" for c in chat(through, "expert-2", PROMPTS[5], stream=True) if c.choices
        )
        assert streamed == chat(client, "expert-2", PROMPTS[5]).choices[0].message.content
    finally:
        proxy.stop()


# ------------------------------------------------------------------ backend-command


def test_backend_command(run_dir, capsys):
    from gradientspace.models.loading import resolve

    folders = {s.name: s.folder.resolve() for s in served_adapters(opened_run(run_dir))}
    assert main(["backend-command", str(run_dir), "--backend", "vllm"]) == 0
    words = shlex.split(capsys.readouterr().out)
    assert words[:3] == ["vllm", "serve", resolve("tiny-random")]
    assert words[3:9] == [
        "--enable-lora",
        "--max-lora-rank",
        "8",
        "--max-loras",
        "4",
        "--lora-modules",
    ]  # rank 2 rounds up to 8
    assert words[9:] == [f"{name}={folder}" for name, folder in folders.items()]
    assert main(["backend-command", str(run_dir), "--backend", "sglang", "--port", "30001"]) == 0
    words = shlex.split(capsys.readouterr().out)
    assert words[:7] == [
        "python",
        "-m",
        "sglang.launch_server",
        "--model-path",
        resolve("tiny-random"),
        "--port",
        "30001",
    ]
    assert words[words.index("--max-lora-rank") + 1] == "2" and words[words.index("--max-loras-per-batch") + 1] == "4"
    assert words[words.index("--lora-paths") + 1 :] == [f"{name}={folder}" for name, folder in folders.items()]


@pytest.mark.parametrize(
    "change, named",
    [
        ({"use_dora": True}, "use_dora"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "all"}, "bias"),
        ({"r": 600}, "`r` is 600"),
    ],
)
def test_backend_command_refuses_a_folder_the_backend_cannot_load(run_dir, tmp_path, capsys, change, named):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    config_file = copy / "experts" / "1" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **change}))
    assert main(["backend-command", str(copy), "--backend", "vllm"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and str(config_file) in error and named in error


def test_generate_names_what_answered_as_serve_does(run_dir, capsys):
    """One word for what answered: the public id `serve` gives (its response's `model`), with the router's pick and why the
    fall-back answered, in `generate`'s output too."""
    for threshold, reason in (("1.01", "below_threshold"), ("0", None)):
        capsys.readouterr()
        assert (
            main(["generate", str(run_dir), "--prompt", PROMPTS[0], "--threshold", threshold, "--max-new-tokens", "2"])
            == 0
        )
        (line,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert line["fallback"] == reason
        if reason:
            assert line["expert"] == -1 and line["model"] == served_adapters(opened_run(run_dir))[-1].name
        else:
            assert line["model"] == f"expert-{line['expert']}"
