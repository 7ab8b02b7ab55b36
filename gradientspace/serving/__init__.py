"""Serving routed experts over HTTP.

| module | what |
| --- | --- |
| `engine.py` | one worker thread owns the model and decodes concurrent requests together (mixed adapters in one batch) |
| `protocol.py` | OpenAI request / response schemas, the error shape, the model list, the routing headers |
| `server.py` | `gradientspace serve RUN`: the FastAPI app in front of the engine |
| `guards.py` | in front of both servers: the port bound before anything loads, the API key, the body-size limit |
| `metrics.py` | `GET /metrics` in Prometheus' text format, and the per-status request counter |
| `backends.py` | vLLM / SGLang: adapter-folder checks, launch commands, upstream model names |
| `route_proxy.py` | `gradientspace route RUN --upstream URL`: only the router, relaying to vLLM / SGLang |

FastAPI, uvicorn, httpx and prometheus_client are the optional extra `pip install gradientspace[serve]`.
"""
