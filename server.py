"""Serve a LLaVA model over HTTP: OpenAI and Ollama APIs, a chat page. See `python server.py -h`."""

from mlx_llava.cli.server import main

if __name__ == "__main__":
    main()
