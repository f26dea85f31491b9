"""``alignpro serve``: an OpenAI-compatible proxy (FastAPI + uvicorn) that rewrites prompts on the way.

Modules: ``config`` (:class:`ServeConfig`), ``app`` (the ASGI app), ``upstream`` (the forwarding client),
``rewriting`` (the latest user message through the prompter), ``server`` (building and running it) and
``command`` (the ``alignpro serve`` flags). The app needs the ``serve`` extra:
``pip install 'alignpro-plugins[serve]'``.
"""
