"""An OpenAI- and Ollama-compatible server for LLaVA, with a web chat page.

    python -m mlx_llava.server --model demo --port 8080

`app.py` holds the routes (parse, validate, hand over), `schemas.py` the APIs' objects,
`messages.py` the conversation -> prompt rendering and the picture policy, `worker.py` the
generation thread (continuous batching, the prompt-cache LRU; under `mlx.launch --pipeline`,
the same turns on every rank), `ollama.py` the Ollama routes, `static/` the page.
"""

from .app import ServerConfig, create_app, make_worker
from .worker import GenerationRequest, Worker

__all__ = ["GenerationRequest", "ServerConfig", "Worker", "create_app", "make_worker"]
